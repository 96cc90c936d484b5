"""Peak memory of the loss's token log-probs at a real vocabulary: full logits vs ``ops.linear_token_logp`` (issue 16).

One loss forward + backward over B sequences of C completion tokens with a V-word LM head: the token log-probs under
the rollout's token distribution, times random advantages, summed, then ``backward`` to the hidden states and the
head's weight. Two paths:
- ``plain``: ``F.linear`` -> (B, C, V) logits -> ``Sampling.token_scores`` -> ``ops.token_logp`` (what expertrl did
  before issue 16; TRL's ``selective_log_softmax`` also starts from full logits);
- ``chunked``: ``ops.linear_token_logp`` (logits in chunks of ``ops.LOGIT_CHUNK``, forward and backward).

How it is measured: each path runs in a fresh child process (so no allocator cache or earlier peak is shared). The
child builds its inputs, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), reads VmRSS,
runs forward + backward once, and reads VmHWM: the reported peak is VmHWM - VmRSS-before, i.e. what the loss
computation added on top of the hidden states, the weight and its inputs. Linux only; CPU.

    .venv/bin/python benchmarks/logp_memory.py                          # B=8, C=1024, V=150000, H=256
    .venv/bin/python benchmarks/logp_memory.py --batch 2 --width 256    # quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(path: str, B: int, C: int, V: int, H: int, temperature: float, suppress: tuple[int, ...]) -> dict:
    import torch
    import torch.nn.functional as F

    from expertrl.ops import linear_token_logp, token_logp
    from expertrl.types import Sampling

    torch.manual_seed(0)
    hidden = torch.randn(B, C, H, requires_grad=True)
    weight = (0.02 * torch.randn(V, H)).requires_grad_()
    tokens = torch.randint(0, V, (B, C))
    if suppress:
        tokens[torch.isin(tokens, torch.tensor(suppress))] = V - 1  # a suppressed token is never sampled
    advantages = torch.randn(B, 1)
    sampling = Sampling(do_sample=True, token_temperature=temperature, suppress_tokens=suppress)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if path == "plain":
        logp = token_logp(sampling.token_scores(F.linear(hidden, weight)), tokens)  # (B, C) via (B, C, V) logits
    else:
        logp = linear_token_logp(hidden, weight, tokens, temperature=sampling.score_temperature, suppress=suppress)
    (logp * advantages).sum().backward()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - before
    return {"path": path, "peak_bytes": peak, "seconds": seconds, "logp_sum": float(logp.detach().double().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="B sequences")
    ap.add_argument("--width", type=int, default=1024, help="C completion tokens per sequence")
    ap.add_argument("--vocab", type=int, default=150_000, help="V")
    ap.add_argument("--hidden", type=int, default=256, help="H (the head's input width)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--suppress", type=str, default="", help="comma-separated suppressed token ids")
    ap.add_argument("--paths", default="plain,chunked")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    suppress = tuple(int(x) for x in args.suppress.split(",") if x)
    shape = (args.batch, args.width, args.vocab, args.hidden, args.temperature, suppress)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return
    results = []
    for path in args.paths.split(","):
        cmd = [sys.executable, __file__, "--child", path, "--batch", str(args.batch), "--width", str(args.width),
               "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--temperature", str(args.temperature),
               "--suppress", args.suppress]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{path}: child failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    logits_gib = args.batch * args.width * args.vocab * 4 / 2**30
    print(f"B={args.batch} C={args.width} V={args.vocab} H={args.hidden} T={args.temperature} suppress={suppress}: "
          f"one float32 (B, C, V) tensor is {logits_gib:.2f} GiB")  # fmt: skip
    for r in results:
        peak = r["peak_bytes"] / 2**30
        print(f"  {r['path']:>8}: peak +{peak:.3f} GiB, {r['seconds']:.1f} s, sum logp {r['logp_sum']:.6g}")
    by = {r["path"]: r for r in results}
    if "plain" in by and "chunked" in by:
        print(f"  chunked / plain peak: {by['chunked']['peak_bytes'] / by['plain']['peak_bytes']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
