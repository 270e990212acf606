"""What the GGUF types cost: a trained checkpoint exported as f32, f16 and q8_0, each file loaded by
transformers (and by llama.cpp when its Python binding, llama-cpp-python, is installed) and scored on
held-out text against lmforge's own logits.

For each type: file size, mean next-token loss (nats; and its change from lmforge's) over
``--windows`` windows of the model's block size, the largest logit difference from lmforge's float32
logits and how often the most likely next token is the same. The text is the last 10% of
tinyshakespeare.txt in ../shared/data.

    lmforge train -c shakespeare-bpe --train.max_steps=400 --train.warmup_steps=20 --model.dropout=0 \\
        --model.d_model=128 --model.n_layer=4 --model.n_head=4 --model.block_size=128 \\
        --train.batch_size=8 --train.grad_accum=1 --train.dtype=float32 --train.out_dir=runs/gguf-bench
    python benchmarks/gguf_types.py runs/gguf-bench [--windows 32]

Prints a table and writes benchmarks/results/gguf.json (command, commit, machine, date).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SHARED_DATA, print_table, write_result  # noqa: E402

from lmforge.interop.gguf import DTYPES, export_gguf  # noqa: E402
from lmforge.train.checkpoint import load_model  # noqa: E402


def loss(logits: torch.Tensor, windows: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()


def compare(name: str, logits: torch.Tensor, exact: torch.Tensor, windows: torch.Tensor) -> dict:
    return {"reader": name, "loss": loss(logits, windows), "max_logit_diff": (logits - exact).abs().max().item(),
            "same_argmax": (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a run or checkpoint directory (gpt2- or llama-shaped, byte-level BPE)")
    ap.add_argument("--windows", type=int, default=32, help="windows of block_size tokens to score (default: 32)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None

    model, cfg, tok = load_model(args.checkpoint)
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    T = cfg.model.block_size
    ids = tok.encode(text[int(len(text) * 0.9):])[: args.windows * T]
    windows = torch.tensor(ids).view(-1, T)
    with torch.no_grad():
        exact = model(windows)
    rows = [{"type": "lmforge", "reader": "lmforge", "loss": loss(exact, windows), "max_logit_diff": 0.0,
             "same_argmax": 1.0}]
    kw = {"n_positions": T, "n_inner": cfg.model.ff_dim} if cfg.model.pos_encoding == "learned" else {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            path = Path(tmp) / f"model-{dtype}.gguf"
            export_gguf(args.checkpoint, path, dtype=dtype, log=lambda *_: None)
            size = path.stat().st_size
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, **kw).eval()
            with torch.no_grad():
                logits = hf(windows).logits
            rows.append({"type": dtype, "bytes": size, **compare("transformers", logits, exact, windows)})
            if llama_cpp is not None:
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=T, n_batch=T, n_threads=1, logits_all=True,
                                      type_k=0, type_v=0, flash_attn=False, verbose=False)  # float32 key/value cache
                scores = []
                for w in windows:
                    llm.reset()
                    llm.eval(w.tolist())
                    scores.append(torch.from_numpy(np.array(llm.scores[:T])))
                rows.append({"type": dtype, "bytes": size, **compare("llama.cpp", torch.stack(scores), exact, windows)})
    for row in rows:
        row["loss_change"] = row["loss"] - rows[0]["loss"]
    print(f"{args.checkpoint}: {windows.numel():,} tokens ({len(windows)} windows of {T}) from the end of "
          "tinyshakespeare.txt")
    print_table(rows, ["type", "reader", "bytes", "loss", "loss_change", "max_logit_diff", "same_argmax"])
    result = {"checkpoint": str(args.checkpoint), "tokens": windows.numel(), "rows": rows}
    print(f"wrote {write_result('gguf', result)}")


if __name__ == "__main__":
    main()
