"""Generate tiny random-weight models for the end-to-end tests (no model hub needed).

Run with the vLLM venv's interpreter (it has torch, transformers, tokenizers, peft):

    ~/.cache/vllm-model-router/venv-vllm/bin/python scripts/make_tiny_models.py [--out DIR] [--force]

Writes into ``$MODELS_DIR`` (default ``~/.cache/vllm-model-router/models``):

- ``tiny-chat-a``: Llama, 2 layers, hidden 128, 2 heads (head_dim 64), with a chat template
- ``tiny-chat-b``: Llama, 4 layers, hidden 256, 4 heads (head_dim 64)
- ``tiny-embed``: Llama-architecture model meant for ``--runner pooling --convert embed``
- ``tiny-chat-a-lora``: a rank-8 LoRA adapter for tiny-chat-a on q_proj/v_proj
- ``broken-model``: a directory whose config.json is incomplete, so vLLM refuses to load it

Each finished directory gets a ``.complete`` stamp holding the recipe version; a
directory with a matching stamp is skipped, so the script is cheap to re-run. Seeds are
fixed, so the weights are the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RECIPE = "tiny-models-v2"
STAMP = ".complete"

# head_dim must stay 64: smaller head sizes crash vLLM's CPU attention kernel.
CHAT_A = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
              intermediate_size=256, seed=1)
CHAT_B = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4,
              intermediate_size=512, seed=2)
EMBED = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=256, seed=3)
LORA_SEED = 4

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A router starts model servers on demand and stops the least recently used one.",
    "Hello! How are you today? I am fine, thank you.",
    "What is the capital of France? The capital of France is Paris.",
    "Tiny models answer with random words, but they answer quickly.",
    "Please write a short poem about the sea, the wind and the stars.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Streaming responses arrive chunk by chunk over server-sent events.",
    "Embeddings turn text into vectors of numbers.",
    "The weather is sunny in the morning and rainy in the evening.",
    "Count the apples, the oranges and the bananas on the table.",
    "This sentence is here so that the tokenizer learns a few more words.",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def log(msg: str) -> None:
    print(f"[make_tiny_models] {msg}", file=sys.stderr, flush=True)


def is_complete(path: Path) -> bool:
    stamp = path / STAMP
    return stamp.is_file() and stamp.read_text().strip() == RECIPE


def build(path: Path, force: bool, writer: Callable[[Path], None]) -> None:
    """Run ``writer`` into a temporary sibling directory, then move it into place."""
    if is_complete(path) and not force:
        log(f"{path.name}: present, skipped")
        return
    t0 = time.monotonic()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    try:
        writer(tmp)
        (tmp / STAMP).write_text(RECIPE + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"{path.name}: written in {time.monotonic() - t0:.1f} s")


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # BPE over a Metaspace pre-tokenizer: every token decodes to plain ASCII text, so
    # streamed deltas are never held back waiting for the rest of a UTF-8 sequence.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\u2581"]  # printable ASCII, newline, Metaspace
    trainer = trainers.BpeTrainer(vocab_size=448, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_llama(out: Path, spec: dict[str, Any], tokenizer: Any) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(spec)
    seed = spec.pop("seed")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **spec,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    with torch.no_grad():
        # Random weights would emit special tokens (EOS included) now and then; zeroing their
        # output rows puts their logits at 0, below the best random logit, so greedy decoding
        # never ends early and every streamed delta carries visible text.
        special_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS})
        model.lm_head.weight[special_ids] = 0.0
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def make_lora(out: Path, base_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(LORA_SEED)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # random A and B, so the adapter visibly changes the output
    )
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # peft's model-card stub
    # Point at the generic name rather than this machine's absolute path.
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "tiny-chat-a"
    cfg["target_modules"] = sorted(cfg["target_modules"])  # a set inside peft: fix the order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_broken(out: Path, tokenizer: Any) -> None:
    # Names an architecture but leaves out every size; vLLM stops while reading the config.
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                 "hidden_size": "not-a-number"}) + "\n")
    tokenizer.save_pretrained(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = os.environ.get("MODELS_DIR") or str(Path.home() / ".cache/vllm-model-router/models")
    parser.add_argument("--out", default=default_out, help="output directory (default: $MODELS_DIR)")
    parser.add_argument("--force", action="store_true", help="regenerate even when present")
    args = parser.parse_args()
    out = Path(args.out).expanduser().resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    t0 = time.monotonic()
    names = ["tiny-chat-a", "tiny-chat-b", "tiny-embed", "tiny-chat-a-lora", "broken-model"]
    if not args.force and all(is_complete(out / n) for n in names):
        log(f"all models present in {out}")
        return 0

    tokenizer = make_tokenizer()
    build(out / "tiny-chat-a", args.force, lambda d: make_llama(d, CHAT_A, tokenizer))
    build(out / "tiny-chat-b", args.force, lambda d: make_llama(d, CHAT_B, tokenizer))
    build(out / "tiny-embed", args.force, lambda d: make_llama(d, EMBED, tokenizer))
    build(out / "tiny-chat-a-lora", args.force, lambda d: make_lora(d, out / "tiny-chat-a"))
    build(out / "broken-model", args.force, lambda d: make_broken(d, tokenizer))
    log(f"models ready in {out} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
