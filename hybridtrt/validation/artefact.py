"""Validate an artefact end to end: pick the reference and backend, build the inputs, run
`runner.validate`. Used by ``hybridtrt validate`` and ``hybridtrt demo``."""

from __future__ import annotations

from pathlib import Path

import torch

from hybridtrt.errors import ArtefactError, InputError
from hybridtrt.exporter.manifest import read_manifest
from hybridtrt.models.loading import load_model
from hybridtrt.models.tokenizer import load_tokenizer
from hybridtrt.validation.routing import routing_for
from hybridtrt.validation.runner import Report, pad_left, random_prompts, validate
from hybridtrt.validation.subjects import engine_subject, hf_subject, ort_subject, torch_subject
from hybridtrt.validation.tolerances import precision_of

BACKENDS = ("ort", "trt")
REFERENCES = ("pytorch", "hf")


def load_prompts(path: str | Path, checkpoint: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt per non-empty line, tokenized with the checkpoint's tokenizer, left-padded."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompts file {p} does not exist")
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
) -> Report:
    """Compare an export (or engine) with the PyTorch reference, or the reference with HF.

    Args:
        export_dir: ``hybridtrt export`` output (None only with ``reference="hf"``).
        checkpoint: The source checkpoint (default: the one recorded in ``hybridtrt.json``).
        backend: ``"ort"`` or ``"trt"`` (``engine`` defaults to ``export_dir/model.engine``).
        reference: ``"pytorch"`` (artefact vs our reference) or ``"hf"`` (our reference vs HF
            transformers on the same checkpoint).
        prompts: File with one prompt per line (tokenized with the checkpoint's tokenizer).
        random_n: Number of random prompts (default 4 when no ``prompts``).
        steps: Decode steps.
        per_layer: Per-layer comparison (needs an export made with ``--per-layer``).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}", fix=f"use one of {BACKENDS}")
    if reference not in REFERENCES:
        raise InputError(f"unknown reference {reference!r}", fix=f"use one of {REFERENCES}")
    manifest = read_manifest(export_dir) if export_dir is not None else None
    if checkpoint is None:
        if manifest is None:
            raise InputError("give --checkpoint (and/or an export directory)")
        checkpoint = manifest.source["checkpoint"]
    if not Path(checkpoint).is_dir():
        raise ArtefactError(f"checkpoint {checkpoint} does not exist", fix="pass --checkpoint CKPT_DIR")
    model = load_model(checkpoint, "fp32")
    if prompts is not None:
        ids, mask = load_prompts(prompts, checkpoint)
    else:
        ids, mask = random_prompts(random_n or 4, model.config.vocab_size, seed=seed)

    if reference == "hf":
        from hybridtrt.validation.hf import load_hf

        ours = torch_subject(model)
        theirs = hf_subject(load_hf(checkpoint), model.config.pattern)
        report = validate(ours, theirs, ids, mask, precision="fp32", steps=steps, per_layer=False)
        report.pattern = model.config.pattern
        return report

    if manifest is None:
        raise InputError("an export directory is needed unless --reference hf")
    if backend == "ort":
        from hybridtrt.runtime.onnxruntime import OrtModel

        if manifest.dtype == "bf16":
            raise InputError(
                "ONNX Runtime's CPU provider has no bf16 kernels",
                fix="validate a bf16 export with --backend trt on a GPU machine, or export fp32/fp16",
            )
        subject = ort_subject(OrtModel(export_dir))
    else:
        from hybridtrt.runtime import load

        subject = engine_subject(load(engine or Path(export_dir) / "model.engine"))
    routing = routing_for(model, ids, mask)
    report = validate(subject, torch_subject(model), ids, mask, precision=precision_of(manifest), steps=steps, per_layer=per_layer, routing=routing)
    report.pattern = model.config.pattern
    return report
