"""``hybridtrt generate ARTEFACT --prompt "..."``: stream text from any backend.

ARTEFACT is an export directory or its ``model.onnx`` (ONNX Runtime), a ``.engine`` (TensorRT) or a
checkpoint directory (the PyTorch reference, handy for comparisons). A tensor-parallel export (``export
--tp N``) runs as N processes: its top directory on ONNX Runtime (CPU), one of its rank engines
(``OUT/rank0/model.engine``) with every rank's engine on its own GPU
(`hybridtrt.runtime.tensor_parallel`). The tokenizer is the
checkpoint's ``tokenizer.json``, found through the export's manifest (and an engine's sidecar);
``--tokenizer DIR`` overrides it, and ``--ids`` runs without one.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridtrt.cli.common import add_integrity_argument, check_integrity, console

HELP = "generate text from an export dir, model.onnx, model.engine or checkpoint dir (streams tokens)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artefact", help="export directory, model.onnx, model.engine, or checkpoint directory")
    add_integrity_argument(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="prompt text (needs a tokenizer)")
    src.add_argument("--ids", default=None, help='prompt token ids, e.g. "1 2 3" (no tokenizer needed)')
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 32)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k best tokens (default 0 = all)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the checkpoint's)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--plugins", default=None, help="TensorRT plugin library (default: the one recorded in the engine's sidecar)")
    p.add_argument(
        "--bf16",
        choices=["fp32", "emulate"],
        default="fp32",
        help="a bf16 export on ONNX Runtime CPU (no bf16 kernels): compute in fp32 from its bf16 weights (default; as fast as an fp32 export) "
        "or emulate bf16 rounding as TensorRT computes (1.2-1.4x slower; what validate judges)",
    )
    sp = p.add_argument_group("speculative decoding (greedy's tokens; README)")
    sp.add_argument(
        "--speculative",
        choices=["ngram", "mtp"],
        default=None,
        help="draft with an n-gram lookup in the text so far, or with the checkpoint's MTP head (a checkpoint dir, or an export made with --speculative)",
    )
    sp.add_argument("--draft-len", type=int, default=None, metavar="K", help="tokens drafted per verify call (default 3)")
    lc = p.add_argument_group("long context (README: Long context)")
    lc.add_argument("--prefill-chunk", type=int, default=None, metavar="N", help="prefill long prompts in calls of at most N tokens (default 2048)")
    lc.add_argument("--save-snapshot", default=None, metavar="FILE", help="prefill the prompt, write its state snapshot to FILE and stop (with --snapshot: the snapshot of the longer prefix)")
    lc.add_argument("--snapshot", default=None, metavar="FILE", help="continue after a snapshot written by --save-snapshot (the prompt is what follows it); checked against this model first")
    lc.add_argument("--force", action="store_true", help="let --save-snapshot replace an existing FILE")


@dataclass
class Target:
    """What ``artefact`` resolved to: a Stepper, its backend name, the checkpoint and EOS id."""

    stepper: Any
    backend: str
    checkpoint: Path | None
    eos_token_id: int | None
    #: What model this is, for snapshots (``checkpoint_sha256``; filled by `resolve(..., identity=True)`).
    identity: dict[str, str] = field(default_factory=dict)


def reference_fits(checkpoint: Path, dtype: str = "fp32") -> None:
    """Refuse, from the safetensors headers and config alone, a reference load the machine cannot hold:
    every parameter in ``dtype``, the largest tensor once more as stored (it is read, then converted)
    and a working margin, against `hybridtrt.memory.available_memory`.

    Raises:
        InputError: Not enough memory (needed vs available, and how to proceed).
        ConfigError, CheckpointError: The checkpoint cannot be opened (see `open_checkpoint`).
    """
    from hybridtrt.memory import check_memory
    from hybridtrt.models.loading import open_checkpoint

    ckpt = open_checkpoint(checkpoint, dtype)
    largest = max((t.nbytes for t in ckpt.index.tensors.values()), default=0)
    needed = ckpt.parameter_bytes + largest + _WORKING_MARGIN
    check_memory(
        needed,
        what=f"the PyTorch reference of {checkpoint} ({ckpt.num_parameters:,} parameters in {dtype})",
        fix=f"export it (hybridtrt export {checkpoint} -o OUT streams the weights tensor by tensor) and generate from OUT, "
        "or run on a machine with more memory",
    )


#: Memory beyond the weights a reference generation uses (activations, states, the interpreter's own).
_WORKING_MARGIN = 256 * 2**20


def _identity(export_dir: Path | None) -> dict[str, str]:
    from hybridtrt.exporter.manifest import MANIFEST_FILE, read_manifest
    from hybridtrt.runtime.snapshot import CHECKPOINT_SHA256

    if export_dir is None or not (export_dir / MANIFEST_FILE).is_file():
        return {}
    sha = read_manifest(export_dir).source.get("sha256")
    return {CHECKPOINT_SHA256: sha} if isinstance(sha, str) and sha else {}


def resolve(artefact: str | Path, *, plugins: str | None = None, identity: bool = False, bf16: str = "fp32") -> Target:
    """Load ``artefact`` with its backend and find its checkpoint (for the tokenizer).

    Args:
        bf16: How ONNX Runtime runs a bf16 export (`hybridtrt.runtime.onnxruntime.BF16_MODES`).
        identity: Also record what model it is (`Target.identity`, for snapshots): the checkpoint
            sha256 an export's manifest records, or the hash of a checkpoint directory (reads it whole).

    Raises:
        ArtefactError: Not an export, ``.onnx``, ``.engine`` or checkpoint.
        MissingDependencyError: A ``.engine`` without TensorRT or a GPU.
        InputError: A checkpoint whose reference does not fit in memory (`reference_fits`).
    """
    from hybridtrt.errors import ArtefactError
    from hybridtrt.exporter.manifest import MANIFEST_FILE, read_manifest
    from hybridtrt.runtime import load

    path = Path(artefact)
    if is_tensor_parallel(path):
        return _resolve_tensor_parallel(path, plugins=plugins, bf16=bf16)
    config = path / "config.json"  # a FIFO or /dev/zero in its place is refused by the config reader, by name
    if path.is_dir() and not (path / MANIFEST_FILE).is_file() and (config.exists() or config.is_symlink()):
        from hybridtrt.models import load_model
        from hybridtrt.runtime.generation import TorchStepper

        reference_fits(path)
        model = load_model(path)
        ident: dict[str, str] = {}
        if identity:
            from hybridtrt.exporter.manifest import checkpoint_hash
            from hybridtrt.runtime.snapshot import CHECKPOINT_SHA256

            ident = {CHECKPOINT_SHA256: checkpoint_hash(path)}
        return Target(TorchStepper(model), "pytorch", path, model.config.eos_token_id, ident)
    if path.suffix == ".engine" and path.is_file():
        from hybridtrt.engine.sidecar import read_sidecar

        sidecar = read_sidecar(path)
        ckpt = sidecar["source"].get("checkpoint")
        export_dir = Path(sidecar["source"].get("export_dir") or "")
        if (export_dir / MANIFEST_FILE).is_file():  # the export's manifest is the source of truth
            ckpt = read_manifest(export_dir).source.get("checkpoint") or ckpt
        model = load(path, **({"plugins": plugins} if plugins else {}))
        ident = _identity(export_dir if sidecar["source"].get("export_dir") else None) if identity else {}
        return Target(model, "tensorrt", Path(ckpt) if ckpt else None, sidecar["model"].get("eos_token_id"), ident)
    model = load(path, bf16=bf16)
    half = model.unified.emulated_bf16 or model.unified.widened_bf16
    backend = "onnxruntime" + ({"fp32": " (bf16 weights, fp32 compute)", "emulate": " (bf16 emulated)"}[bf16] if half else "")
    export_dir = path.parent if path.suffix == ".onnx" else path
    if not (export_dir / MANIFEST_FILE).is_file():
        raise ArtefactError(f"{export_dir} has no {MANIFEST_FILE}", fix="pass an export directory")
    manifest = read_manifest(export_dir)
    ckpt = manifest.source.get("checkpoint")
    ident = _identity(export_dir) if identity else {}
    return Target(model, backend, Path(ckpt) if ckpt else None, manifest.model.get("eos_token_id"), ident)


def is_tensor_parallel(path: str | Path) -> bool:
    """``path`` is the top directory of ``export --tp N`` or one of its ranks' engines."""
    from hybridtrt.exporter.manifest import is_tp_export

    path = Path(path)
    if path.is_dir():
        return is_tp_export(path)
    if path.suffix == ".engine" and path.is_file():
        from hybridtrt.engine.sidecar import read_sidecar, sidecar_path

        return sidecar_path(path).is_file() and bool(read_sidecar(path).get("tensor_parallel"))
    return False


def _resolve_tensor_parallel(path: Path, *, plugins: str | None, bf16: str) -> Target:
    """A tensor-parallel model's N processes (`TensorParallelModel`), its checkpoint and EOS from rank 0's manifest."""
    from hybridtrt.exporter.manifest import read_manifest
    from hybridtrt.runtime.tensor_parallel import TensorParallelModel, tensor_parallel_spec

    options: dict[str, Any] = {"bf16": bf16, "threads": 1} if path.is_dir() else ({"plugins": plugins} if plugins else {})
    spec = tensor_parallel_spec(path, **options)
    rank0 = read_manifest(Path(spec.artefacts[0]) if path.is_dir() else Path(spec.artefacts[0]).parent, integrity=None)
    model = TensorParallelModel(spec)
    ckpt = rank0.source.get("checkpoint")
    return Target(model, model.backend, Path(ckpt) if ckpt else None, rank0.model.get("eos_token_id"))


class IncrementalText:
    """Decode a growing token list and return only the new text (holds back partial UTF-8)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new

    def flush(self) -> str:
        """Whatever is still held back (e.g. bytes that never formed a valid character)."""
        text = self.tokenizer.decode(self.tokens) if self.tokens else ""
        new, self.emitted = text[self.emitted :], len(text)
        return new


def _prompt_ids(args: argparse.Namespace, tokenizer: Any) -> list[int]:
    from hybridtrt.errors import InputError

    if args.ids is not None:
        try:
            ids = [int(x) for x in args.ids.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"--ids must be integers separated by spaces, got {args.ids!r}", fix='e.g. --ids "1 2 3"') from None
        if bad := next((i for i in ids if not 0 <= i < 2**63), None):  # an int64 tensor cannot hold it
            raise InputError(f"token id {bad} is outside [0, 2^63) (--ids), let alone the vocabulary", fix="check the --ids you passed")
    else:
        if tokenizer is None:
            raise InputError("no tokenizer.json found for this artefact", fix="pass --tokenizer DIR (a directory with tokenizer.json) or --ids")
        ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise InputError("the prompt is empty", fix="pass a non-empty --prompt or --ids")
    return ids


def run(args: argparse.Namespace) -> int:
    from hybridtrt.errors import InputError
    from hybridtrt.runtime.generation import SamplingConfig

    # Flags, the snapshot to continue and the file to write are checked before anything loads.
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} must be ≥ 1", fix="e.g. --max-new-tokens 32")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise InputError(f"--prefill-chunk {args.prefill_chunk} must be ≥ 1", fix="give the longest prefill call in tokens, e.g. --prefill-chunk 2048")
    sampling = SamplingConfig(
        temperature=args.temperature if args.temperature is not None else 0.0,
        top_k=args.top_k if args.top_k is not None else 0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        seed=args.seed,
    )
    if args.ids is not None:
        _prompt_ids(args, None)  # malformed or out-of-range ids, before anything loads
    _check_speculative(args, sampling)
    if is_tensor_parallel(args.artefact):
        for flag, given in (("--speculative", args.speculative), ("--snapshot", args.snapshot), ("--save-snapshot", args.save_snapshot)):
            if given:
                raise InputError(
                    f"{flag} with a tensor-parallel model is not built yet ({args.artefact} runs as N rank processes)",
                    fix=f"drop {flag}, or use a one-device export",
                )
    snapshot = None
    if args.save_snapshot:
        from hybridtrt.runtime.snapshot import check_writable

        check_writable(args.save_snapshot, overwrite=args.force)
    if args.snapshot:
        from hybridtrt.runtime.snapshot import Snapshot

        snapshot = Snapshot.load(args.snapshot)

    check_integrity(args, args.artefact)

    target = resolve(args.artefact, plugins=args.plugins, identity=bool(args.snapshot or args.save_snapshot), bf16=args.bf16)
    try:
        return _generate(args, target, sampling, snapshot)
    finally:
        close = getattr(target.stepper, "close", None)  # a tensor-parallel model's rank processes
        if close is not None:
            close()


def _generate(args: argparse.Namespace, target: Target, sampling: Any, snapshot: Any) -> int:
    import torch

    from hybridtrt.errors import InputError
    from hybridtrt.models.tokenizer import load_tokenizer
    from hybridtrt.runtime.generation import iter_generate

    if snapshot is not None:
        from hybridtrt.runtime.snapshot import check_snapshot

        check_snapshot(snapshot, target.stepper, target.identity, source=f"snapshot {args.snapshot}")
    tok_dir = Path(args.tokenizer) if args.tokenizer else target.checkpoint
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None and tok_dir.is_dir() else None
    if args.tokenizer and tokenizer is None:
        raise InputError(f"{args.tokenizer} has no tokenizer.json", fix="point --tokenizer at a directory with tokenizer.json")
    ids = _prompt_ids(args, tokenizer)
    eos = None if args.ignore_eos else target.eos_token_id
    if args.save_snapshot:
        import dataclasses

        from rich.markup import escape

        from hybridtrt.runtime.snapshot import snapshot_prompt

        start = time.perf_counter()
        snap = snapshot_prompt(target.stepper, torch.tensor([ids], dtype=torch.long), prefill_chunk=args.prefill_chunk, snapshot=snapshot)
        path = dataclasses.replace(snap, identity=target.identity).save(args.save_snapshot, overwrite=args.force)
        extended = f" ({snapshot.past} from {args.snapshot} + {len(ids)})" if snapshot is not None else ""
        console.print(f"[dim]snapshot of {snap.past} positions{escape(extended)} written to {escape(str(path))} in {time.perf_counter() - start:.2f} s · backend {target.backend}[/]", soft_wrap=True)
        return 0

    text = IncrementalText(tokenizer) if tokenizer is not None and args.ids is None else None
    times: list[float] = []
    count = 0
    stats = None
    if args.speculative:
        from hybridtrt.runtime.speculative import DEFAULT_DRAFT_LEN, SpeculationStats, iter_speculative

        stats = SpeculationStats()
        drafter = _drafter(args.speculative, target)
        k = args.draft_len if args.draft_len is not None else DEFAULT_DRAFT_LEN
        stream = iter_speculative(target.stepper, drafter, torch.tensor([ids], dtype=torch.long), max_new_tokens=args.max_new_tokens or 32, draft_len=k, eos_token_id=eos, prefill_chunk=args.prefill_chunk, stats=stats)
    else:
        stream = iter_generate(
            target.stepper,
            torch.tensor([ids], dtype=torch.long),
            max_new_tokens=args.max_new_tokens or 32,
            sampling=sampling,
            eos_token_id=eos,
            prefill_chunk=args.prefill_chunk,
            snapshot=snapshot,
        )
    start = time.perf_counter()
    for tokens in stream:
        times.append(time.perf_counter())
        token = int(tokens[0])
        if eos is not None and token == eos:
            break
        count += 1
        piece = text.push(token) if text is not None else f"{token} "
        if piece:
            console.out(piece, end="", highlight=False)
    if text is not None and (rest := text.flush()):
        console.out(rest, end="", highlight=False)
    prefill_ms = (times[0] - start) * 1e3 if times else 0.0
    decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
    rate = f"{(len(times) - 1) / decode_s:.1f} tokens/s" if decode_s > 0 else "n/a"
    console.out("")
    console.print(f"[dim]prefill {prefill_ms:.1f} ms · decode {rate} · {count} new tokens · backend {target.backend}[/]", soft_wrap=True)
    if stats is not None:
        acceptance = f"{100 * stats.acceptance:.1f} %" if stats.drafted else "n/a (nothing drafted)"
        console.print(
            f"[dim]speculative {args.speculative}, draft length {k} · acceptance {acceptance} · {stats.tokens_per_verify:.2f} tokens per verify call · "
            f"{stats.tokens_per_main_call:.2f} per main-model call ({stats.verify_calls} verify, {stats.replay_calls} rollback)[/]",
            soft_wrap=True,
        )
    return 0


def _check_speculative(args: argparse.Namespace, sampling: Any) -> None:
    """Refuse speculative flags that cannot go together, before anything loads."""
    from hybridtrt.errors import InputError
    from hybridtrt.runtime.speculative import MAX_DRAFT_LEN

    if args.speculative is None:
        if args.draft_len is not None:
            raise InputError(f"--draft-len {args.draft_len} needs --speculative", fix="add --speculative ngram or --speculative mtp, or drop --draft-len")
        return
    if args.draft_len is not None and not 1 <= args.draft_len <= MAX_DRAFT_LEN:
        raise InputError(f"--draft-len {args.draft_len} must be in 1..{MAX_DRAFT_LEN}", fix="NVIDIA's Nemotron-3 recipes draft 3")
    if sampling.temperature != 0 or sampling.top_k or sampling.top_p != 1:
        raise InputError("--speculative decodes greedily (its tokens are exactly greedy decoding's); sampling flags were given", fix="drop --temperature/--top-k/--top-p, or drop --speculative")
    if args.snapshot or args.save_snapshot:
        raise InputError("--speculative does not continue or save snapshots yet", fix="drop --snapshot/--save-snapshot, or drop --speculative")


def _drafter(kind: str, target: Target) -> Any:
    """The drafter of ``--speculative kind`` for ``target``."""
    from hybridtrt.errors import InputError
    from hybridtrt.runtime.speculative import MtpDrafter, NgramDrafter

    if kind == "ngram":
        return NgramDrafter()
    if target.backend == "pytorch":
        from hybridtrt.models.mtp import load_mtp

        model = target.stepper.model
        return MtpDrafter(model, load_mtp(target.checkpoint, model))
    if not hasattr(target.stepper, "mtp_head"):
        raise InputError(f"the MTP draft head runs on the reference and ONNX Runtime; {target.backend} has none yet", fix="use --speculative ngram, or an export directory")
    return MtpDrafter(target.stepper.mtp_head())
