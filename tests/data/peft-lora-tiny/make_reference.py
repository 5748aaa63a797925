"""Writes the PEFT LoRA reference that tests/it/lora.rs checks against.

A tiny random Llama (transformers) with two LoRA adapters made by the `peft` package itself,
with random nonzero A and B (`init_lora_weights=False`):

  base/        config.json, model.safetensors (float32)
  adapter-a/   target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], r = 4,
               lora_alpha = 8 (s = 2)
  adapter-b/   target_modules = ".*\\.(q_proj|up_proj)" (a regex), r = 2, lora_alpha = 6,
               use_rslora (s = 6/√2)
  reference.safetensors
      input_ids            [3, 7] int64
      logits.a, logits.b   [3, 7, V]: the PEFT model's logits (adapters unmerged)
      merged.a             [3, 7, V]: logits of merge_and_unload() of adapter-a
      grad.NAME            ∂L/∂(adapter-a tensor NAME) by torch autograd, L = Σ_b Σ_t
                           −log p(ids[b, t+1] | ids[b, ≤t]) (every next token a target)

Run from the repository root with an environment that has torch, transformers and peft:
    python tests/data/peft-lora-tiny/make_reference.py
(made with torch 2.15.0, transformers 5.24.0, peft 0.22.0; the outputs are committed).
"""
import json
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
base = LlamaForCausalLM(cfg).float().eval()
base.save_pretrained(f"{OUT}/base", safe_serialization=True)
ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
ref = {"input_ids": ids}

adapters = {
    "a": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "b": LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, init_lora_weights=False,
                    use_rslora=True, target_modules=r".*\.(q_proj|up_proj)"),
}
for name, lc in adapters.items():
    fresh = LlamaForCausalLM.from_pretrained(f"{OUT}/base", torch_dtype=torch.float32).eval()
    torch.manual_seed(10 + ord(name))
    peft_model = get_peft_model(fresh, lc).eval()
    peft_model.save_pretrained(f"{OUT}/adapter-{name}", safe_serialization=True)
    # The base as a path relative to the adapter folder (the absolute one is this machine's),
    # and no generated model card.
    cfg_path = f"{OUT}/adapter-{name}/adapter_config.json"
    with open(cfg_path) as f:
        saved = json.load(f)
    saved["base_model_name_or_path"] = "../base"
    with open(cfg_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
    os.remove(f"{OUT}/adapter-{name}/README.md")
    # Reload as a user would, so the reference is what the saved files mean.
    again = LlamaForCausalLM.from_pretrained(f"{OUT}/base", torch_dtype=torch.float32).eval()
    loaded = PeftModel.from_pretrained(again, f"{OUT}/adapter-{name}").eval()
    for n, p in loaded.named_parameters():
        p.requires_grad_("lora_" in n)
    logits = loaded(input_ids=ids).logits
    ref[f"logits.{name}"] = logits.detach().contiguous()
    if name == "a":
        lp = torch.log_softmax(logits[:, :-1], -1)
        loss = -lp.gather(-1, ids[:, 1:, None]).sum()
        loss.backward()
        for n, p in loaded.named_parameters():
            if "lora_" in n:
                key = n.replace(".default", "")
                ref[f"grad.{key}"] = p.grad.detach().contiguous()
        merged = loaded.merge_and_unload()
        ref["merged.a"] = merged(input_ids=ids).logits.detach().contiguous()
save_file(ref, f"{OUT}/reference.safetensors")
print("wrote", OUT)
