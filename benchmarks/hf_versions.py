"""How far each transformers release is from the reference on a real-shaped Nemotron-H.

Builds a scaled Nemotron-Nano-9B-v2 (real head_dim 80, d_state 128, 8 groups, chunk 128, GQA) with
HF's own ``save_pretrained`` and HF's own init (``initializer_range`` 0.02 as the real config;
``dt_bias`` from dt log-uniform in [time_step_min, time_step_max] = [0.001, 0.1], as mamba_ssm and HF
initialise it, so dt sits near 0.001 as in a real checkpoint). Each transformers release is
installed once with ``pip install --target`` into a cache (with the dependencies that release asks
for, which shadow the locked ones in its child process only) and run in a child process; the parent
runs our reference on the same inputs.

Per release: rel L2 of the prefill's last logits and of 32 teacher-forced decode steps (the
reference's greedy tokens fed to both) against the reference, the worst SSM state after prefill,
and top-1 agreement of the decode steps. The share of prefill dt values below ``time_step_min``
says how often the 5.15–5.24 clamp bites on this config.

    python benchmarks/hf_versions.py [--releases 5.14.1 5.24.0 5.25.0] [--prompt 512] [--steps 32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

CACHE = Path(tempfile.gettempdir()) / "hybridtrt-hf-releases"


def _child(ckpt: str, inputs: str, out: str) -> None:
    """Run HF (the release on sys.path) on the saved inputs; write its logits and states."""
    import transformers

    from hybridtrt.models.config import load_config
    from hybridtrt.validation.hf import HfStepper, load_hf

    data = np.load(inputs)
    ids, tokens = torch.from_numpy(data["ids"]), torch.from_numpy(data["tokens"])
    stepper = HfStepper(load_hf(ckpt), load_config(ckpt).pattern)
    mask = torch.ones_like(ids)
    logits, cache = stepper.step(ids, mask, None, False)
    try:  # HF updates its cache in place: copy the states now
        states = {k: v.float().clone().numpy() for k, v in stepper.named_states(cache).items() if k.startswith("present_ssm")}
    except AttributeError:  # releases before 5.24 keep states behind another cache API
        states = {}
    steps = []
    for k in range(tokens.shape[1]):
        mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], 1)
        step, cache = stepper.step(tokens[:, k : k + 1], mask, cache, True)
        steps.append(step.numpy())
    np.savez(out, prefill=logits.numpy(), steps=np.stack(steps, 1), version=transformers.__version__, **states)


def _install(release: str) -> Path:
    target = CACHE / release
    if not (target / "transformers").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(target), f"transformers=={release}"],
            check=True,
        )
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--releases", nargs="+", default=["5.14.1", "5.24.0", "5.25.0"])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(*args.child)

    from hybridtrt.judge.metrics import compare
    from hybridtrt.models import load_model
    from hybridtrt.models.architectures import scaled_config, write_hf_checkpoint
    from hybridtrt.runtime.generation import TorchStepper

    work = Path(tempfile.mkdtemp(prefix="hf_versions_"))
    cfg = scaled_config("nemotron-nano-9b-v2", width=8, layers=8, vocab=2048)
    ckpt = write_hf_checkpoint(cfg, work / "ckpt", initializer_range=0.02, seed=0)
    model = load_model(ckpt)
    ids = torch.randint(3, cfg["vocab_size"], (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))

    below: list[float] = []  # share of prefill dt (softplus(dt_raw + dt_bias)) below time_step_min, per layer
    hooks = []
    for block in model.layers:
        if block.kind == "M":
            hooks.append(block.mixer.in_proj.register_forward_hook(lambda m, i, o, mixer=block.mixer: below.append(
                float((torch.nn.functional.softplus(o[..., -mixer.num_heads :].float() + mixer.dt_bias.float()) < cfg["time_step_min"]).float().mean()))))
    stepper = TorchStepper(model)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref_prefill, state = stepper.step(ids, mask, stepper.zero_state(args.batch), False)
    for h in hooks:
        h.remove()
    ref_states = {k: v for k, v in state.named_states().items() if k.startswith("present_ssm")}
    tokens, steps, logits = [], [], ref_prefill
    for _ in range(args.steps):
        token = logits.argmax(-1)[:, None]
        tokens.append(token)
        mask = torch.cat([mask, torch.ones(args.batch, 1, dtype=mask.dtype)], 1)
        logits, state = stepper.step(token, mask, state, True)
        steps.append(logits)
    ref_steps = torch.stack(steps, 1)
    np.savez(work / "inputs.npz", ids=ids.numpy(), tokens=torch.cat(tokens, 1).numpy())

    print(f"scaled nemotron-nano-9b-v2 ({sum(b.kind == 'M' for b in model.layers)} Mamba layers), prompt {args.prompt} × {args.batch}, "
          f"{args.steps} teacher-forced steps; prefill dt < time_step_min ({cfg['time_step_min']}): {100 * np.mean(below):.2f} %")
    print(f"{'transformers':<13}{'prefill rel L2':>15}{'worst SSM state':>17}{'decode rel L2':>15}{'decode top-1':>14}")
    for release in args.releases:
        target = _install(release)
        out = work / f"hf-{release}.npz"
        env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, __file__, "--child", str(ckpt), str(work / "inputs.npz"), str(out)], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            print(f"{release:<13}fails: {done.stderr.strip().splitlines()[-1][:60]}")
            continue
        hf = np.load(out)
        assert str(hf["version"]) == release, (hf["version"], release)
        worst = max((compare(ref_states[k], hf[k]).rel_l2 for k in ref_states if k in hf), default=float("nan"))
        decode = compare(ref_steps, hf["steps"], top1=True)
        shown = "n/a" if worst != worst else f"{worst:.2e}"
        print(f"{release:<13}{compare(ref_prefill, hf['prefill']).rel_l2:>15.2e}{shown:>17}{decode.rel_l2:>15.2e}{decode.top1:>14.3f}")


if __name__ == "__main__":
    main()
