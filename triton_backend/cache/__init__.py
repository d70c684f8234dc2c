"""The cache layer: where keys and values live, and the plan of one packed forward pass over them."""
