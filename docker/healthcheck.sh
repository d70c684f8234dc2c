#!/usr/bin/env bash
# Healthy only when the whole pipeline can serve: the ensemble is ready (not just the Triton process).
exec curl -sf "http://localhost:${HTTP_PORT:-8000}/v2/models/ensemble/ready"
