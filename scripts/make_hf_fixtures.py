"""Reference fixtures for `origami eval --hf-checkpoint`: tiny random Mixtral and Qwen2-MoE models
built with HuggingFace transformers, with the loss and logits transformers computes.

For each fixture, crates/origami/tests/fixtures/hf/<name>/ gets config.json, model.safetensors,
input_ids.json ({"input_ids": [[...], ...]}) and expected.json (loss for labels=input_ids, logits,
versions). transformers >= 5 saves experts fused (experts.gate_up_proj [E, 2F, H], gate rows first;
experts.down_proj [E, H, F]); the *_per_expert fixtures rename the same tensors to the older
per-expert layout (Mixtral block_sparse_moe.experts.E.w1/w3/w2, Qwen2-MoE
mlp.experts.E.gate_proj/up_proj/down_proj) and are checked to load back to the same logits.

Run from the repository root: python scripts/make_hf_fixtures.py  (see scripts/README.md)
"""
import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

OUT = Path("crates/origami/tests/fixtures/hf")
VOCAB, BATCH, SEQ = 96, 2, 12


def mixtral():
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        tie_word_embeddings=False, initializer_range=0.2)
    return MixtralForCausalLM(cfg)


def qwen2_moe():
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=24, shared_expert_intermediate_size=36, norm_topk_prob=False,
                         mlp_only_layers=[0], decoder_sparse_step=1, max_position_embeddings=64,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         tie_word_embeddings=False, initializer_range=0.2, qkv_bias=True)
    return Qwen2MoeForCausalLM(cfg)


def reference(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.loss.item(), out.logits


def write_expected(directory, ids, loss, logits):
    (directory / "input_ids.json").write_text(json.dumps({"input_ids": ids.tolist()}) + "\n")
    expected = {"loss": loss, "logits_shape": list(logits.shape), "logits": [round(v, 7) for v in logits.flatten().tolist()],
                "transformers": transformers.__version__, "torch": torch.__version__}
    (directory / "expected.json").write_text(json.dumps(expected) + "\n")


def per_expert(tensors, moe_block, names):
    """Renames fused expert tensors to one tensor per expert (names: gate, up, down)."""
    out = {}
    for key, value in tensors.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("mlp.experts.gate_up_proj")] + moe_block
            ffn = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{names[0]}.weight"] = value[e, :ffn].contiguous()
                out[f"{prefix}.experts.{e}.{names[1]}.weight"] = value[e, ffn:].contiguous()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("mlp.experts.down_proj")] + moe_block
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{names[2]}.weight"] = value[e].contiguous()
        elif key.endswith("mlp.gate.weight") and moe_block != "mlp":
            out[key.replace("mlp.gate.weight", f"{moe_block}.gate.weight")] = value
        else:
            out[key] = value
    return out


def build(name, make, seed, moe_block, names):
    torch.manual_seed(seed)
    model = make().float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "weight") and gate.weight.shape[0] == model.config.to_dict().get("num_local_experts", model.config.to_dict().get("num_experts")):
                gate.weight.mul_(4.0)  # clear top-k choices: no near ties
            for proj in ("q_proj", "k_proj", "v_proj"):
                bias = getattr(layer.self_attn, proj).bias
                if bias is not None:
                    bias.normal_(0.0, 0.3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed + 1))
    loss, logits = reference(model, ids)
    native = OUT / name
    shutil.rmtree(native, ignore_errors=True)
    model.save_pretrained(native, safe_serialization=True)
    for extra in native.glob("generation_config.json"):
        extra.unlink()
    write_expected(native, ids, loss, logits)

    split = OUT / f"{name}_per_expert"
    shutil.rmtree(split, ignore_errors=True)
    split.mkdir(parents=True)
    shutil.copy(native / "config.json", split / "config.json")
    tensors = load_file(native / "model.safetensors")
    save_file(per_expert(tensors, moe_block, names), split / "model.safetensors", metadata={"format": "pt"})
    write_expected(split, ids, loss, logits)
    reloaded = type(model).from_pretrained(split).float().eval()
    re_loss, re_logits = reference(reloaded, ids)
    assert torch.allclose(re_logits, logits, atol=1e-6), f"{split} does not load back to the same logits"
    print(f"{name}: loss {loss:.6f}; per-expert layout reloads identically (loss {re_loss:.6f})")


def main():
    build("mixtral_tiny", mixtral, 11, "block_sparse_moe", ("w1", "w3", "w2"))
    build("qwen2_moe_tiny", qwen2_moe, 23, "mlp", ("gate_proj", "up_proj", "down_proj"))


if __name__ == "__main__":
    main()
