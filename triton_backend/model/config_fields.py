"""Every field of Megatron-core's ``TransformerConfig``, and what serving does with it.

A checkpoint's ``args`` can set any of them. Each is either read into the model's architecture, refused at start
by name when set to anything but the plain value (``architecture.NOT_SERVED``), or harmless here, for the reason
its group names. ``tests/unit/test_config_fields.py`` fails when megatron-core gains a field that is in none of
these, so that an upgrade cannot slip a new one past.
"""

from __future__ import annotations

# Read into ``GPTArchitecture`` (under the args' own names: swiglu for gated_linear_unit, norm_epsilon for
# layernorm_epsilon, squared_relu or swiglu for activation_func).
READ = {"num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
        "layernorm_epsilon", "add_bias_linear", "gated_linear_unit", "activation_func", "normalization",
        "qk_layernorm", "rotary_interleaved", "layernorm_zero_centered_gamma", "window_size",
        "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_score_function",
        "moe_router_pre_softmax", "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias",
        "moe_router_num_groups", "moe_router_group_topk", "moe_shared_expert_intermediate_size",
        "moe_shared_expert_gate", "moe_layer_freq"}

# Refused when set (config name -> the args name ``NOT_SERVED`` checks).
REFUSED = {"window_attn_skip_freq": "window_attn_skip_freq",
           "multi_latent_attention": "multi_latent_attention", "softmax_type": "softmax_type",
           "add_qkv_bias": "add_qkv_bias", "moe_latent_size": "moe_latent_size",
           "moe_apply_probs_on_input": "moe_apply_probs_on_input",
           "moe_router_topk_limited_devices": "moe_router_topk_limited_devices",
           "apply_residual_connection_post_layernorm": "apply_residual_connection_post_layernorm",
           "qk_l2_norm": "qk_l2_norm", "mrope_section": "mrope_section", "softmax_scale": "softmax_scale",
           "attention_output_gate": "attention_output_gate", "no_rope_freq": "no_rope_freq",
           "glu_linear_offset": "glu_linear_offset", "activation_func_clamp_value": "activation_func_clamp_value",
           "experimental_attention_variant": "experimental_attention_variant",
           "linear_attention_freq": "linear_attention_freq", "is_hybrid_model": "is_hybrid_model",
           "heterogeneous_block_specs": "heterogeneous_layers_config_path", "mtp_num_layers": "mtp_num_layers"}

HARMLESS = {
    # The served job sets these itself (TP, and the layout of its own ranks); the saved TP only shaped the files.
    "parallelism": {
        "tensor_model_parallel_size", "pipeline_model_parallel_comm_backend", "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size", "sequence_parallel", "context_parallel_size",
        "hierarchical_context_parallel_sizes", "max_seqlen_per_dp_cp_rank", "hybrid_context_parallel",
        "expert_model_parallel_size", "expert_tensor_parallel_size", "moe_extended_tp", "pipeline_dtype",
        "variable_seq_lengths", "overlap_p2p_comm", "batch_p2p_comm", "batch_p2p_sync", "use_ring_exchange_p2p",
        "deallocate_pipeline_outputs", "overlap_p2p_comm_warmup_flush", "microbatch_group_size_per_vp_stage",
        "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout",
        "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split", "cp_comm_type",
        "async_tensor_model_parallel_allreduce", "tp_comm_overlap", "tp_comm_bulk_wgrad", "tp_comm_bulk_dgrad",
        "tp_comm_overlap_ag", "tp_comm_overlap_rs", "tp_comm_overlap_rs_dgrad", "tp_comm_split_ag",
        "tp_comm_atomic_ag", "tp_comm_split_rs", "tp_comm_atomic_rs", "tp_comm_overlap_disable_qkv",
        "tp_comm_overlap_disable_fc1", "tp_comm_bootstrap_backend", "overlap_moe_expert_parallel_comm",
        "symmetric_ar_type", "inference_fuse_tp_communication",
    },
    # Training: initialisation, dropout, losses, gradients, recomputation, offloading, logging.
    "training": {
        "perform_initialization", "use_cpu_initialization", "timers", "finalize_model_grads_func", "grad_scale_func",
        "no_sync_func", "grad_sync_func", "param_sync_func", "num_microbatches_with_partial_activation_checkpoints",
        "gradient_accumulation_fusion", "use_te_rng_tracker", "cross_entropy_loss_fusion", "cross_entropy_fusion_impl",
        "delay_wgrad_compute", "ep_overlap_early_attn_memory_release", "defer_embedding_wgrad_compute",
        "wgrad_deferral_limit", "mtp_standalone", "mtp_loss_scaling_factor", "cpu_offloading",
        "cpu_offloading_num_layers", "_cpu_offloading_context", "cpu_offloading_activations", "cpu_offloading_weights",
        "cpu_offloading_double_buffering", "barrier_with_L1_time", "hidden_dropout", "attention_dropout",
        "test_mode", "calculate_per_token_loss", "init_method", "output_layer_init_method", "init_method_std",
        "embedding_init_method", "embedding_init_method_std", "init_model_with_meta_device", "recompute_granularity",
        "recompute_method", "recompute_num_layers", "distribute_saved_activations", "recompute_modules",
        "qk_clip", "qk_clip_alpha", "qk_clip_threshold", "log_max_attention_logit", "dsa_indexer_loss_coeff",
        "dsa_indexer_use_sparse_loss", "config_logger_dir", "fine_grained_activation_offloading", "offload_modules",
        "min_offloaded_tensor_size", "deterministic_mode", "clone_scatter_output_in_embedding",
        "disable_parameter_transpose_cache",
    },
    # Which kernel computes the same math: the server picks its own (attention, norms, rotary, fused ops).
    "kernels": {
        "attention_backend", "bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm",
        "memory_efficient_layer_norm", "bias_dropout_fusion", "apply_rope_fusion", "use_fused_weighted_squared_relu",
        "fused_single_qkv_rope", "use_te_activation_func", "transformer_impl", "use_kitchen",
        "use_kitchen_attention", "kitchen_attention_backend", "flash_decode", "batch_invariant_mode",
        "use_inference_optimized_layers", "mlp_chunks_for_prefill", "hetereogenous_dist_checkpoint",
        "use_mamba_mem_eff_path", "disable_bf16_reduced_precision_matmul", "activation_func_fp8_input_store",
    },
    # Numerically neutral at inference: query-key layer scaling divides the scores by the layer number and the
    # softmax multiplies it back; the server's attention takes its softmax in float32 whatever the setting.
    "neutral": {"apply_query_key_layer_scaling", "attention_softmax_in_fp32"},
    # Precision and quantisation recipes of training: the server's DTYPE decides how it computes.
    "precision": {
        "fp16", "bf16", "params_dtype", "enable_autocast", "autocast_dtype", "fp32_residual_connection", "fp8",
        "fp8_recipe", "fp8_param", "fp8_quantizer_factory", "fp8_margin", "fp8_interval", "fp8_amax_history_len",
        "fp8_amax_compute_algo", "fp8_wgrad", "fp8_dot_product_attention", "fp8_multi_head_attention",
        "tp_only_amax_red", "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16",
        "fp4", "fp4_recipe", "fp4_param", "fp4_quantizer_factory", "quant_recipe",
    },
    # The server's own runtime: CUDA graphs (CUDA_GRAPHS), sampling seeds.
    "runtime": {
        "enable_cuda_graph", "cuda_graph_use_single_mempool", "cuda_graph_retain_backward_graph",
        "cuda_graph_warmup_steps", "external_cuda_graph", "cuda_graph_impl", "cuda_graph_scope",
        "inference_rng_tracker", "inference_sampling_seed",
    },
    # Mixture-of-experts training and kernels: load-balancing losses and bias updates, token dropping (inference is
    # dropless: every token reaches its top-k experts), how tokens travel and which GEMMs compute the experts.
    "moe": {
        "moe_shared_expert_overlap", "moe_router_load_balancing_type", "moe_enable_routing_replay",
        "moe_router_padding_for_quantization", "moe_router_padding_for_fp8", "moe_router_dtype",
        "moe_router_bias_update_rate", "moe_router_force_load_balancing", "moe_grouped_gemm",
        "moe_use_legacy_grouped_gemm", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_input_jitter_eps",
        "moe_token_dropping", "moe_token_dispatcher_type", "moe_enable_deepep", "moe_flex_dispatcher_backend",
        "moe_per_layer_logging", "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity",
        "moe_token_drop_policy", "moe_layer_recompute", "moe_permute_fusion", "moe_router_fusion",
        "moe_deepep_num_sms", "moe_hybridep_num_sms",
    },
    # Other model families' settings: they take effect only with a flag that is refused (is_hybrid_model,
    # experimental_attention_variant, linear_attention_freq).
    "other families": {
        "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads", "dsa_indexer_n_heads",
        "dsa_indexer_head_dim", "dsa_indexer_topk", "linear_conv_kernel_dim", "linear_key_head_dim",
        "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
    },
}
