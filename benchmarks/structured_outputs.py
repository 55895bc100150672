"""Structured outputs: throughput of a batch where half the rows are JSON-schema constrained
against the same batch with none, in one run, and the per-step cost of the token bitmask.

    python benchmarks/structured_outputs.py                   # 32 rows, 128 tokens, bundled model
    python benchmarks/structured_outputs.py --rows 8 --max-tokens 32

Both runs use the offline ``LLM`` with default flags on the same chat prompts and greedy
decoding. In the ``none`` run every row generates ``--max-tokens`` tokens (``ignore_eos``);
in the ``half`` run the even rows carry ``structured_outputs.json`` (a bounded object
schema: name, age, role enum, tags array) and stop when the JSON is complete, the odd
rows run as before. Reported: output tokens/s of each run, and for the ``half`` run the
time spent in :meth:`StructuredOutputManager.apply_bitmask` (filling every constrained
row's bitmask with xgrammar and applying it) per engine step, and in the matchers'
``accept`` calls, against the mean step time.
"""

from __future__ import annotations

import argparse
import time

from argosy.runtime.core.llm import LLM
from argosy.runtime.core.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 12}},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
TOPICS = ["a pilot", "a chef", "a student", "a doctor", "an engineer", "a farmer", "a painter", "a teacher"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    llm = LLM(args.model)
    tok = llm.tokenizer
    prompts = [{"prompt_token_ids": tok.apply_chat_template(
        [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} (person {i}) as a JSON object."}],
        add_generation_prompt=True, tokenize=True, return_dict=False)} for i in range(args.rows)]
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.generate(prompts[:2], [free, constrained])  # warm-up: kernels, grammar engine import and compile

    eng = llm.engine
    timers = {"mask": 0.0, "accept": 0.0}
    orig_apply, steps = eng.structured.apply_bitmask, [0]
    orig_step = eng.step

    def timed_apply(logits, states):
        t = time.perf_counter()
        orig_apply(logits, states)
        timers["mask"] += time.perf_counter() - t

    def counted_step():
        steps[0] += 1
        return orig_step()

    orig_advance = eng._advance_grammar

    def timed_advance(req, tok):
        t = time.perf_counter()
        try:
            return orig_advance(req, tok)
        finally:
            timers["accept"] += time.perf_counter() - t

    eng.structured.apply_bitmask = timed_apply
    eng.step = counted_step
    eng._advance_grammar = timed_advance

    results = {}
    for name, params in (("none", [free] * args.rows),
                         ("half", [constrained if i % 2 == 0 else free for i in range(args.rows)])):
        timers.update(mask=0.0, accept=0.0)
        steps[0] = 0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        ntok = sum(len(o.outputs[0].token_ids) for o in outs)
        results[name] = (ntok, wall, steps[0], timers["mask"], timers["accept"])
        if name == "half":
            import json

            ok = sum(1 for i, o in enumerate(outs) if i % 2 == 0 and _valid(json, o.outputs[0].text))
            print(f"constrained rows whose output parses as JSON: {ok}/{(args.rows + 1) // 2}")

    print(f"\n{args.rows} rows x up to {args.max_tokens} tokens, greedy, default flags")
    print(f"{'run':<6}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'steps':>7}{'ms/step':>9}{'mask ms/step':>14}"
          f"{'accept ms/step':>16}")
    for name, (ntok, wall, nsteps, mask, accept) in results.items():
        print(f"{name:<6}{ntok:>8}{wall:>9.2f}{ntok / wall:>9.1f}{nsteps:>7}{wall / nsteps * 1e3:>9.1f}"
              f"{mask / nsteps * 1e3:>14.3f}{accept / nsteps * 1e3:>16.3f}")


def _valid(json, text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
