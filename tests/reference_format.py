"""A config.json in the published LongLLaMA format (syzymon/long_llama_3b_v1_1), with tiny sizes."""


def reference_config_dict(**overrides) -> dict:
    cfg = {
        "architectures": ["LongLlamaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_longllama.LongLlamaConfig",
            "AutoModel": "modeling_longllama.LongLlamaModel",
            "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM",
            "AutoModelForSequenceClassification": "modeling_longllama.LongLlamaForSequenceClassification",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "gradient_checkpoint_every_ith": 1,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "last_context_length": 32,
        "max_position_embeddings": 64,
        "mem_attention_grouping": None,
        "mem_dtype": "bfloat16",
        "mem_layers": [0, 2],
        "mem_positionals": True,
        "model_type": "longllama",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_attention": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.30.0",
        "use_cache": True,
        "vocab_size": 128,
    }
    cfg.update(overrides)
    return cfg
