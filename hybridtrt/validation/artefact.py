"""Validate an artefact end to end: check the checkpoint is the export's, pick the reference and the
backend (or outputs recorded elsewhere), build the inputs, run the comparison, and optionally the
FP8 sensitivity analysis. Used by ``hybridtrt validate`` and ``hybridtrt demo``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hybridtrt.errors import ArtefactError, InputError
from hybridtrt.exporter.manifest import Manifest, read_manifest
from hybridtrt.models.loading import load_model
from hybridtrt.models.tokenizer import load_tokenizer
from hybridtrt.validation.preflight import check_arguments
from hybridtrt.validation.routing import routing_for
from hybridtrt.validation.runner import Report, pad_left, random_prompts, validate
from hybridtrt.validation.subjects import engine_subject, hf_subject, ort_subject, torch_subject
from hybridtrt.validation.tolerances import gate, precision_of

def load_prompts(path: str | Path, checkpoint: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt per non-empty line, tokenized with the checkpoint's tokenizer, left-padded."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompts file {p} does not exist", fix="give a text file with one prompt per line")
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    if not lines:
        raise InputError(f"prompts file {p} has no prompts", fix="write one prompt per line")
    tok = load_tokenizer(checkpoint)
    if tok is None:
        raise InputError(f"checkpoint {checkpoint} has no tokenizer.json to tokenize --prompts", fix="use --random N instead")
    return pad_left([tok.encode(line).ids for line in lines])


def validate_artefact(
    export_dir: str | Path | None,
    checkpoint: str | Path | None = None,
    *,
    backend: str = "ort",
    engine: str | Path | None = None,
    reference: str = "pytorch",
    prompts: str | Path | None = None,
    random_n: int | None = None,
    steps: int = 8,
    per_layer: bool = False,
    seed: int = 0,
    force: bool = False,
    load_outputs: Sequence[str | Path] | None = None,
    load_inputs: Sequence[str | Path] | None = None,
    runner: str | None = None,
    sensitivity: bool = False,
    target_cosine: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Compare an export (or engine, or recorded outputs) with the PyTorch reference, or the
    reference with HF.

    Args:
        export_dir: ``hybridtrt export`` output (None only with ``reference="hf"``).
        checkpoint: The source checkpoint (default: the one recorded in ``hybridtrt.json``); its
            sha256 and config are checked against the record first.
        backend: ``"ort"`` or ``"trt"`` (``engine`` defaults to ``export_dir/model.engine``).
        reference: ``"pytorch"`` (artefact vs our reference) or ``"hf"`` (our reference vs HF
            transformers on the same checkpoint).
        prompts: File with one prompt per line (tokenized with the checkpoint's tokenizer).
        random_n: Number of random prompts (default 4 when no ``prompts``).
        steps: Decode steps.
        per_layer: Per-layer comparison: each layer's states and output, first divergence named.
            Works on every export (layer outputs located by node name, see
            `hybridtrt.validation.layers`).
        force: Compare with a checkpoint whose sha256 differs from the record (same graph I/O).
        load_outputs: Polygraphy ``RunResults`` files/directories recorded elsewhere; compared
            instead of running a backend (`hybridtrt.validation.recorded`).
        load_inputs: The inputs they were recorded with (default: ``inputs.json`` beside the
            first results file, else ``export_dir/polygraphy/inputs.json``).
        runner: Which runner of the results (default: the only non-reference one).
        sensitivity: FP8 exports: per-layer sensitivity and ``--exclude`` flags
            (``report.extras["sensitivity"]``, `hybridtrt.validation.sensitivity`).
        target_cosine: Cosine the exclusions aim for (default: the FP8 logits gate).
        progress: ``progress(done, total)`` during the sensitivity analysis.
    """
    check_arguments(backend=backend, reference=reference, steps=steps, random_n=random_n, load_outputs=load_outputs, target_cosine=target_cosine)
    manifest = read_manifest(export_dir) if export_dir is not None else None
    if sensitivity:
        from hybridtrt.validation.sensitivity import check_recipe

        if manifest is None:
            raise InputError("--sensitivity needs an FP8 export directory", fix="pass the export made with --quantize fp8")
        check_recipe(manifest, export_dir)
    if checkpoint is None:
        if manifest is None:
            raise InputError("give --checkpoint (and/or an export directory)")
        checkpoint = manifest.source["checkpoint"]
    if not Path(checkpoint).is_dir():
        raise ArtefactError(f"checkpoint {checkpoint} does not exist", fix="pass --checkpoint CKPT_DIR")
    notes: list[str] = []
    if manifest is not None:
        from hybridtrt.validation.provenance import check_checkpoint

        notes = check_checkpoint(manifest, export_dir, checkpoint, force=force)
    if reference == "hf":
        return _against_hf(checkpoint, prompts, random_n, steps, per_layer, seed)
    if manifest is None:
        raise InputError("an export directory is needed unless --reference hf")

    if load_outputs:
        report, model = _recorded(export_dir, manifest, checkpoint, load_outputs, load_inputs, runner, per_layer)
    else:
        model = load_model(checkpoint, "fp32")
        ids, mask = _prompts(model, checkpoint, prompts, random_n, seed)
        report = validate(
            _backend_subject(export_dir, manifest, backend, engine),
            torch_subject(model),
            ids,
            mask,
            precision=precision_of(manifest),
            steps=steps,
            per_layer=per_layer,
            routing=routing_for(model, ids, mask),
        )
    report.pattern = model.config.pattern
    report.notes[:0] = notes
    if sensitivity:
        from hybridtrt.validation.sensitivity import fp8_sensitivity

        ids, mask = _prompts(model, checkpoint, prompts, random_n, seed)
        target = target_cosine if target_cosine is not None else gate(precision_of(manifest), "call").min_cosine or 0.99
        report.extras["sensitivity"] = fp8_sensitivity(export_dir, manifest, model, checkpoint, ids, mask, target_cosine=target, progress=progress)
    return report


def _prompts(model, checkpoint, prompts, random_n, seed) -> tuple[torch.Tensor, torch.Tensor]:
    if prompts is not None:
        return load_prompts(prompts, checkpoint)
    return random_prompts(random_n or 4, model.config.vocab_size, seed=seed)


def _against_hf(checkpoint, prompts, random_n, steps, per_layer, seed) -> Report:
    """Our reference (the backend here) against HF transformers."""
    from hybridtrt.validation.hf import load_hf

    model = load_model(checkpoint, "fp32")
    ids, mask = _prompts(model, checkpoint, prompts, random_n, seed)
    theirs = hf_subject(load_hf(checkpoint), model.config.pattern)
    report = validate(torch_subject(model), theirs, ids, mask, precision="fp32", steps=steps, per_layer=per_layer)
    report.pattern = model.config.pattern
    return report


def _backend_subject(export_dir, manifest: Manifest, backend: str, engine):
    if backend == "ort":
        from hybridtrt.runtime.onnxruntime import OrtModel

        if manifest.dtype == "bf16":
            raise InputError(
                "ONNX Runtime's CPU provider has no bf16 kernels",
                fix="validate a bf16 export with --backend trt on a GPU machine, or export fp32/fp16",
            )
        return ort_subject(OrtModel(export_dir))
    from hybridtrt.runtime import load

    return engine_subject(load(engine or Path(export_dir) / "model.engine"))


def default_inputs(export_dir: str | Path, load_outputs: Sequence[str | Path]) -> Path:
    """Where the inputs of recorded outputs are when ``--load-inputs`` is not given."""
    from hybridtrt.validation.polygraphy_bridge import INPUTS

    first = Path(load_outputs[0])
    for candidate in ((first if first.is_dir() else first.parent) / INPUTS, first.parent / INPUTS, Path(export_dir) / "polygraphy" / INPUTS):
        if candidate.is_file():
            return candidate
    raise InputError(
        f"no --load-inputs given and no {INPUTS} beside {first} or in {Path(export_dir) / 'polygraphy'}",
        fix="pass --load-inputs with the inputs the outputs were recorded from (what `hybridtrt compare` wrote)",
    )


def _recorded(export_dir, manifest: Manifest, checkpoint, load_outputs, load_inputs, runner, per_layer):
    """Recorded outputs against the reference: ``(report, reference model)``. The files are read
    and matched before the model is loaded."""
    from hybridtrt.validation.layers import layer_taps
    from hybridtrt.validation.recorded import check_matching, load_feeds, load_results, reference_outputs, validate_recorded

    inputs = list(load_inputs) if load_inputs else [default_inputs(export_dir, load_outputs)]
    feeds = load_feeds(inputs)
    name, iterations = load_results(load_outputs, runner)
    check_matching(feeds, iterations)
    model = load_model(checkpoint, "fp32")
    expected = reference_outputs(model, manifest, feeds)
    report = validate_recorded(feeds, name, iterations, expected, layer_taps(export_dir, manifest), precision=precision_of(manifest), per_layer=per_layer)
    report.notes.append(f"recorded outputs: {', '.join(map(str, load_outputs))}; inputs: {', '.join(map(str, inputs))}")
    return report, model
