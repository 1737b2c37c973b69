"""Evaluate an RWKV6 model (a base, base + adapter, or a merged checkpoint).

    python -m scripts.eval --model BASE.pth [--adapter ADAPTER.safetensors] --problems test.jsonl [--json out.json]
    python -m scripts.eval --model BASE.pth --loss_file val.jsonl            # held-out loss (sft or text jsonl)
    python -m scripts.eval --model BASE.pth --adapter A.safetensors --quant nf4 --problems test.jsonl  # as trained
    python -m scripts.eval --model BASE.pth --generate "User: hi\\n\\nAssistant:" [--temperature 1.0]

--problems: jsonl of {"prompt", "response"} where the response ends in '#### number' (GSM8K style); the model
answers each prompt in the RWKV World chat format and is scored by exact match of the final number.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from src.atomic import atomic_write_text
from src.data.tokenizer import WorldTokenizer
from src.errors import RWKVBoneError
from src.evaluation.evaluate import (
    PROMPT_FORMAT,
    evaluate_exact_match,
    generate,
    held_out_loss,
    read_problems,
)
from src.model import RWKV6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="x060 checkpoint (.pth/.safetensors): a base or a merged model")
    ap.add_argument("--adapter", default=None, help="adapter .safetensors to apply (unmerged) on --model")
    ap.add_argument("--problems", default=None, help="jsonl of GSM8K-style problems to score by exact match")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N problems")
    ap.add_argument("--loss_file", default=None, help="jsonl (text or sft) or binidx prefix: mean loss per token")
    ap.add_argument("--ctx_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--generate", default=None, help="a prompt to continue")
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--wkv_backend", default="auto")
    ap.add_argument("--quant", default=None, choices=("int8", "nf4"),
                    help="hold the base's projections quantised, as train.py --quant trained the adapter")
    args = ap.parse_args(argv)
    try:
        torch.manual_seed(args.seed)
        model = RWKV6.from_checkpoint(args.model, adapter=args.adapter, quant=args.quant,
                                      wkv_backend=args.wkv_backend).eval()
        tokenizer = WorldTokenizer()
        results: dict[str, object] = {"model": args.model, "adapter": args.adapter}
        if args.generate is not None:
            text = generate(model, tokenizer, args.generate, args.max_new_tokens, args.temperature, args.top_p,
                            generator=torch.Generator().manual_seed(args.seed))
            print(text)
            results["generation"] = text
        if args.loss_file:
            loss = held_out_loss(model, args.loss_file, args.ctx_len, args.batch_size)
            results["loss"] = loss
            print(f"held-out loss: {loss:.4f} nats/token")
        if args.problems:
            problems = read_problems(args.problems)[: args.limit]
            em = evaluate_exact_match(model, tokenizer, problems, PROMPT_FORMAT, args.max_new_tokens)
            results.update(accuracy=em.accuracy, correct=em.correct, total=em.total, samples=em.samples)
            print(f"| metric | value |\n|---|---|\n| exact match | {em.correct}/{em.total} = {em.accuracy:.1%} |")
            for s in em.samples[:3]:
                verdict = "ok" if s["correct"] else "wrong"
                print(f"  Q: {s['question']}\n  A: {str(s['prediction']).strip()!r}  ({verdict})")
        if args.json:
            atomic_write_text(args.json, json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    except RWKVBoneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
