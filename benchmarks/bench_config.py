"""The benchmark model shared by every script in benchmarks/: a small random LLaMA (vocab 1000, 4 layers,
hidden 256, 4 heads, FFN 688, window 512). ``LLAMA`` holds the fields plain LLaMA also has; ``LONG`` adds
``last_context_length`` 256 (memory layers are [2, 3] where a script turns memory on)."""

LLAMA = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
LONG = dict(LLAMA, last_context_length=256)
MEM_LAYERS = [2, 3]
