"""llguidance against xgrammar for structured outputs, on the demo model's sentencepiece tokenizer, on CPU.

    PYTHONPATH=/tmp/xgsite .venv/bin/python tools/probes/grammar_engines.py [--steps 100]

xgrammar is no dependency of this project: install it beside the venv, e.g. ``.venv/bin/pip install --target
/tmp/xgsite --no-deps xgrammar==0.2.9 apache-tvm-ffi`` (torch, transformers, pydantic and numpy come from the venv;
triton is never imported on CPU). For JSON schemas of 10 and 20 required properties (integers, strings of at most
8 characters): the tokenizer's one-time setup, a schema's first and cached compile (each with a fresh matcher), and
a decode step's cost per guided row (masks filled, applied to float32 logits, sampled tokens accepted) for 1, 8 and
16 rows over a random walk (tokens drawn from the masked softmax of random logits; a completed row restarts).
llguidance goes through the serving path (``triton_backend.engine.grammar``: its threads fill the masks); xgrammar row
by row on one thread, and as ``xgrammar-b2`` through ``BatchGrammarMatcher`` with 2 threads. ``agree``: steps of
a lockstep walk on tokens both allow where both masks are equal (llguidance keeps a forced stretch to its canonical
tokens and drops byte-fallback duplicates; xgrammar allows no escape in a maxLength string).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from preprocessing import tokenization  # noqa: E402
from triton_backend.engine.grammar import Grammars, apply_guides  # noqa: E402


def schema(n: int) -> str:
    props = {f"p{i}": {"type": "integer"} if i % 2 else {"type": "string", "maxLength": 8} for i in range(n)}
    return json.dumps({"type": "object", "properties": props, "required": list(props), "additionalProperties": False})


def timed(f, *args) -> float:
    t0 = time.perf_counter()
    f(*args)
    return (time.perf_counter() - t0) * 1e3


class LL:
    name = "llguidance"

    def __init__(self, tok):
        self.g, self.eos = Grammars(tok), tok.eos_id
        self.setup_ms = timed(self.g._lltokenizer)  # noqa: SLF001 - the one-time tokenizer setup, timed apart
        self.new = lambda text: self.g.guide("json_schema", text)
        self.mask = lambda logits, ms_: apply_guides(logits, list(range(len(ms_))), ms_, [self.eos] * len(ms_))
        self.accept, self.done = lambda m, t: m.accept(t), lambda m: m.complete()


class XG:
    def __init__(self, tok, threads=0):
        import xgrammar as xgr

        self.name, self.xgr, t0 = "xgrammar" + (f"-b{threads}" if threads else ""), xgr, time.perf_counter()
        # BYTE_FALLBACK reads sentencepiece pieces ('▁' a space, '<0x0A>' a byte); control pieces are blanked,
        # or xgrammar would take '<s>' as text that a JSON string may hold
        vocab = [tok.sp.id_to_piece(i) if b is not None else "" for i, b in enumerate(tok.token_bytes())]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_FALLBACK, vocab_size=tok.vocab_size,
                                 stop_token_ids=[tok.eos_id])
        self.compiler = xgr.GrammarCompiler(info)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads) if threads else None
        self.setup_ms, self.done = (time.perf_counter() - t0) * 1e3, lambda m: m.is_terminated()

    def new(self, text):  # the project's JSON style: no free whitespace, ", " and ": "
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(text, any_whitespace=False,
                                                                         separators=(", ", ": ")))

    def mask(self, logits, ms_):
        bitmask = self.xgr.allocate_token_bitmask(len(ms_), logits.shape[1])
        if self.batch:
            self.batch.batch_fill_next_token_bitmask(ms_, bitmask)
        for i, m in enumerate(ms_ if not self.batch else []):
            m.fill_next_token_bitmask(bitmask, i)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, m, t):
        if not m.accept_token(t):
            raise ValueError(f"xgrammar refused token {t}")


def step_us(eng, text, rows, steps, vocab, warmup=5):
    """Microseconds per row of one step (masks filled and applied, tokens accepted); restarts not counted."""
    gen, ms_, spent = torch.Generator().manual_seed(rows), [eng.new(text) for _ in range(rows)], 0.0
    for s in range(steps + warmup):
        logits = torch.randn(rows, vocab, generator=gen)
        t0 = time.perf_counter()
        eng.mask(logits, ms_)
        t1 = time.perf_counter()
        tokens = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0].tolist()
        t2 = time.perf_counter()
        for m, t in zip(ms_, tokens):
            eng.accept(m, t)
        spent += (t1 - t0 + time.perf_counter() - t2) if s >= warmup else 0.0
        ms_ = [eng.new(text) if eng.done(m) else m for m in ms_]
    return spent / (steps * rows) * 1e6


def agree(a, b, text, steps, vocab):
    """Steps where both engines allow the same tokens, walking both on tokens both allow."""
    gen, ma, mb, same = torch.Generator().manual_seed(0), a.new(text), b.new(text), 0
    for _ in range(steps):
        la, lb = torch.zeros(1, vocab), torch.zeros(1, vocab)
        a.mask(la, [ma]), b.mask(lb, [mb])
        same += bool(torch.equal(torch.isfinite(la), torch.isfinite(lb)))
        both = torch.isfinite(la + lb)
        if not both.any():
            return f"{same}/{steps}: then no token in common"
        t = int(torch.multinomial(both.float() * torch.rand(1, vocab, generator=gen), 1, generator=gen))
        a.accept(ma, t), b.accept(mb, t)
        if a.done(ma) or b.done(mb):
            ma, mb = a.new(text), b.new(text)
    return f"{same}/{steps}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = tokenization.load_path(pathlib.Path(__file__).resolve().parents[2] / "demo_model/tokenizer.model")
    engines = [LL(tok), XG(tok), XG(tok, threads=2)]
    print(f"vocab {tok.vocab_size}, {args.steps} steps, torch {torch.__version__} (1 thread)\n"
          f"{'engine':<12}{'props':>5}{'setup ms':>9}{'first ms':>9}{'cached ms':>10}{'us/row b1':>10}{'b8':>7}"
          f"{'b16':>7}  agree (llguidance vs xgrammar)")
    for n in (10, 20):
        text, rows = schema(n), []
        for eng in engines:
            first, cached = timed(eng.new, text), timed(eng.new, text)
            per = [step_us(eng, text, r, args.steps, tok.vocab_size) for r in (1, 8, 16)]
            rows.append(f"{eng.name:<12}{n:>5}{eng.setup_ms:>9.1f}{first:>9.1f}{cached:>10.3f}{per[0]:>10.1f}"
                        f"{per[1]:>7.1f}{per[2]:>7.1f}")
        rows[0] += "  " + agree(engines[0], engines[1], text, args.steps, tok.vocab_size)  # after both compiles
        print("\n".join(rows))


if __name__ == "__main__":
    main()
