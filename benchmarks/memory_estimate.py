"""Estimated peak GPU memory of the real-size model (SigLIP-so400m + Qwen2.5-0.5B) per stage and mode.

An estimate, not a measurement: parameters are counted exactly (the model is built on the meta device, LoRA
adapters included), the rest is arithmetic:

    weights      4 B/param (fp32 master weights; QLoRA: 0.5 B/param for the LLM's linear layers, bf16 elsewhere)
    gradients    4 B per trained parameter;  AdamW  8 B per trained parameter;  sharded engines divide these three
    activations  bf16, per token per LLM layer 2 B x (7h + 2 kv + 4 ffn) kept for backward (SDPA/flash attention:
                 no L^2 term), or only the layer input (2 B x h) with gradient checkpointing plus one layer's worth
    logits       the LM head runs on supervised tokens only: fp32 logits and their gradient, 8 B x vocab per token
    overhead     1 GiB (CUDA context, allocator slack)

    python benchmarks/memory_estimate.py [--seq_len 1024] [--supervised 400] [--gpus 4]
"""

import argparse

GIB = 2**30


def count_parameters():
    import torch

    from lora import adapter_parameters, add_adapters
    from model import VLM, VLMConfig, preset_configs

    vision, text = preset_configs("real", vocab_size=151936)
    with torch.device("meta"):
        model = VLM(VLMConfig(vision_config=vision, text_config=text))
        counts = {key: sum(p.numel() for p in getattr(model, name).parameters())
                  for key, name in (("vision", "vision_model"), ("projector", "projector"), ("llm", "language_model"))}
        embeddings = model.language_model.get_input_embeddings().weight.numel()
        add_adapters(model, r=64, alpha=128, dropout=0.0)
        counts["lora"] = sum(p.numel() for p in adapter_parameters(model).values())
    return counts, embeddings, text


def estimate(counts, embeddings, text, mode, batch, seq_len, supervised, checkpointing, gpus, shard=None):
    h, ffn, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    total = counts["vision"] + counts["projector"] + counts["llm"]
    trained = {"pretrain": counts["projector"], "full": counts["projector"] + counts["llm"],
               "lora": counts["projector"] + counts["lora"], "qlora": counts["projector"] + counts["lora"]}[mode]
    if mode == "qlora":  # 4-bit linear layers; embeddings, norms, vision, projector and adapters in bf16
        weights = 0.5 * (counts["llm"] - embeddings) + 2 * (embeddings + counts["vision"] + counts["projector"]
                                                            + counts["lora"])
    else:
        weights = 4 * (total + (counts["lora"] if mode == "lora" else 0))
    # ZeRO-2 shards gradients and optimizer state; ZeRO-3 / FSDP2 shard the weights too.
    states = (weights / (gpus if shard == "zero3" else 1)) + 12 * trained / (gpus if shard else 1)
    tokens = batch * seq_len
    per_token_layer = 2 * (7 * h + 2 * kv + 4 * ffn)
    # Even a frozen LLM (stage 1) keeps its activations: the gradient reaches the projector through it.
    activations = tokens * layers * per_token_layer
    if checkpointing:
        activations = tokens * layers * 2 * h + tokens * per_token_layer
    logits = batch * supervised * text.vocab_size * 8
    return (states + activations + logits) / GIB + 1.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sample, 169 image tokens included")
    parser.add_argument("--supervised", type=int, default=400, help="supervised (reply) tokens per sample")
    parser.add_argument("--gpus", type=int, default=4, help="GPUs for the sharded rows (FSDP2 / ZeRO-3)")
    args = parser.parse_args()

    counts, embeddings, text = count_parameters()
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()) + " (LoRA r=64, LLM)")
    print(f"sequence {args.seq_len} tokens, {args.supervised} supervised; estimates in GiB\n")
    print("| stage / mode | micro-batch | checkpointing | GPUs | est. peak GiB |")
    print("| --- | --- | --- | --- | --- |")
    rows = [("pretrain (projector; 256 tokens, 32 supervised)", "pretrain", 32, False, 1, None),
            ("pretrain (projector; 256 tokens, 32 supervised)", "pretrain", 32, True, 1, None),
            ("SFT full", "full", 4, False, 1, None), ("SFT full", "full", 4, True, 1, None),
            ("SFT full", "full", 8, True, 1, None), ("SFT LoRA r=64", "lora", 4, True, 1, None),
            ("SFT QLoRA r=64 (4-bit LLM)", "qlora", 4, True, 1, None),
            ("SFT QLoRA r=64 (4-bit LLM)", "qlora", 8, True, 1, None),
            ("SFT full, ZeRO-2", "full", 4, True, args.gpus, "zero2"),
            ("SFT full, FSDP2 / ZeRO-3", "full", 4, True, args.gpus, "zero3"),
            ("DPO full, 4 pairs = 8 rows", "full", 8, True, 1, None)]
    for name, mode, batch, checkpointing, gpus, shard in rows:
        seq_len, supervised = (256, 32) if mode == "pretrain" else (args.seq_len, args.supervised)
        gib = estimate(counts, embeddings, text, mode, batch, seq_len, supervised, checkpointing, gpus, shard)
        print(f"| {name} | {batch} | {'on' if checkpointing else 'off'} | {gpus} | {gib:.1f} |")


if __name__ == "__main__":
    main()
