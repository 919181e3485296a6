"""Validate an artefact end to end: check the checkpoint is the export's, pick the reference and the
backend (or outputs recorded elsewhere), build the inputs, run the comparison, and optionally the
FP8 / INT4 sensitivity analysis. Used by ``hybridtrt validate`` and ``hybridtrt demo``."""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hybridtrt.errors import ArtefactError, InputError
from hybridtrt.exporter.fp8_reference import FP32_DITHER, as_exported
from hybridtrt.exporter.manifest import Manifest, read_manifest, refuse_alone
from hybridtrt.models.config import load_config
from hybridtrt.models.loading import load_model, parse_dtype
from hybridtrt.models.tokenizer import load_tokenizer
from hybridtrt.reading import read_text
from hybridtrt.validation.preflight import check_arguments
from hybridtrt.validation.runner import Report, pad_left, random_prompts, validate
from hybridtrt.validation.subjects import Subject, engine_subject, hf_subject, ort_subject, torch_subject
from hybridtrt.judge.tolerances import precision_of
from hybridtrt.judge.yardsticks import Judged, yardstick_for

#: The logits cosine that `--sensitivity`'s ``--exclude`` flags aim for by default.
TARGET_COSINE = 0.99


def load_prompts(path: str | Path, checkpoint: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt per non-empty line, tokenized with the checkpoint's tokenizer, left-padded."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompts file {p} does not exist", fix="give a text file with one prompt per line")
    text = read_text(p, what="prompts file", error=InputError, fix="give a UTF-8 text file with one prompt per line", limit=16 * 2**20)
    lines = [line for line in text.splitlines() if line.strip()]
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
    recipe: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    yardstick: bool = True,
    prompt_length: int | None = None,
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
        sensitivity: FP8 and INT4 exports: per-layer sensitivity and ``--exclude`` flags
            (``report.extras["sensitivity"]``, `hybridtrt.validation.sensitivity`).
        target_cosine: Cosine the exclusions aim for (default `TARGET_COSINE`).
        recipe: With ``sensitivity``, a recipe (name or file, `hybridtrt.exporter.recipes`) whose
            layer table is measured beside the search's.
        progress: ``progress(done, total)`` during the sensitivity analysis.
        yardstick: Run the precision's yardstick beside the backend (fp64 for fp32 artefacts, the
            same-dtype reference for fp16/bf16; `hybridtrt.judge.tolerances`) so the gates scale
            with what the precision can promise. False: the fixed floors are the gates.
        prompt_length: Length of the longest random prompt (default 48; the others are shorter,
            left-padded). Prompts of several chunks exercise the scan's chunk carry.
    """
    check_arguments(
        backend=backend, reference=reference, steps=steps, random_n=random_n, load_outputs=load_outputs, target_cosine=target_cosine, prompt_length=prompt_length
    )
    manifest = read_manifest(export_dir) if export_dir is not None else None
    if manifest is not None:
        refuse_alone(export_dir, manifest)
    if sensitivity:
        from hybridtrt.validation.sensitivity import check_recipe

        if manifest is None:
            raise InputError("--sensitivity needs an FP8 or INT4 export directory", fix="pass the export made with --quantize fp8 (or int4)")
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
        return _against_hf(checkpoint, prompts, random_n, steps, per_layer, seed, yardstick, prompt_length)
    if manifest is None:
        raise InputError("an export directory is needed unless --reference hf")

    if load_outputs:
        report, model = _recorded(export_dir, manifest, checkpoint, load_outputs, load_inputs, runner, per_layer)
    else:
        model = as_exported(load_model(checkpoint, "fp32"), manifest)  # an FP8 export: the FP8 reference
        ids, mask = _prompts(model, checkpoint, prompts, random_n, seed, prompt_length)
        precision = precision_of(manifest)
        report = validate(
            _backend_subject(export_dir, manifest, backend, engine),
            torch_subject(model, name=_reference_name(manifest)),
            ids,
            mask,
            precision=precision,
            steps=steps,
            per_layer=per_layer,
            yardstick=yardstick_subject(checkpoint, precision, manifest.state_dtype, manifest=manifest) if yardstick else None,
        )
        int4 = bool(manifest.weight_only) and manifest.weight_only.get("scheme") == "int4"
        if (manifest.quantization or int4) and yardstick:
            report.quality = recipe_quality(checkpoint, manifest, model, ids, mask, steps=steps)
        elif manifest.quantization or int4:
            report.notes.append("--no-yardstick: the recipe's cost is not judged (its gate is relative to the yardstick run)")
        elif manifest.weight_only:
            report.notes.append(
                "4-bit weights from the checkpoint itself (NVFP4): its cost against unquantized weights is not judged here "
                "(the BF16 original is not at hand; benchmarks/modelopt_formats.py measures it on scaled copies)"
            )
    report.pattern = model.config.pattern
    report.notes[:0] = notes
    if sensitivity:
        from hybridtrt.validation.sensitivity import layer_sensitivity

        ids, mask = _prompts(model, checkpoint, prompts, random_n, seed, prompt_length)
        target = target_cosine if target_cosine is not None else TARGET_COSINE
        truth = load_model(checkpoint, "fp32")  # unquantized: each layer's cost is against the truth
        compared = None
        if recipe is not None:
            from hybridtrt.exporter.recipes import load_recipe

            compared = load_recipe(recipe)
        report.extras["sensitivity"] = layer_sensitivity(
            export_dir, manifest, truth, checkpoint, ids, mask, target_cosine=target, progress=progress, recipe=compared
        )
    return report


def _prompts(model, checkpoint, prompts, random_n, seed, prompt_length=None) -> tuple[torch.Tensor, torch.Tensor]:
    if prompts is not None:
        return load_prompts(prompts, checkpoint)
    longest = prompt_length or 48
    return random_prompts(random_n or 4, model.config.vocab_size, seed=seed, min_len=min(4, longest), max_len=longest)


def yardstick_subject(
    checkpoint: str | Path, precision: str, state_dtype: str = "fp32", judged: Judged = "artefact", manifest: Manifest | None = None
) -> Subject | None:
    """The yardstick of `hybridtrt.judge.yardsticks.yardstick_for`, loaded, or None.

    For an artefact: our reference in fp64 (states too: what the fp32 reference itself rounds), or in
    the artefact's model and state dtypes (its unavoidable rounding); for an FP8 artefact the FP8
    reference in the export's dtype (``manifest`` gives the recipe). For our reference judged
    against HF: HF transformers in fp64.
    """
    spec = yardstick_for(judged, precision, manifest.dtype if manifest is not None else "fp32")
    if spec is None:
        return None
    if spec.implementation == "hf":
        from hybridtrt.validation.hf import load_hf

        return hf_subject(load_hf(checkpoint, torch.float64), load_config(checkpoint).pattern, name=spec.name, rowwise=True)
    if spec.dtype == "fp64":
        model, states = load_model(checkpoint, "fp32").double(), torch.float64
    else:
        model, states = load_model(checkpoint, spec.dtype), parse_dtype(state_dtype)
    if spec.fp8 is not None:
        if manifest is None or not (manifest.quantization or (manifest.weight_only or {}).get("activations")):
            raise ValueError(f"the {spec.name} yardstick needs the manifest of an export with quantized activations")
        model = as_exported(model, manifest, dynamic=spec.fp8 == "dynamic", dither=FP32_DITHER if spec.fp8 == "dithered" else None)
    elif spec.weights == "rtn":  # the same 4-bit layers rounded to nearest: the recipe without its AWQ scales
        if manifest is None or not manifest.weight_only:
            raise ValueError(f"the {spec.name} yardstick needs the 4-bit export's manifest")
        plain = {k: v for k, v in manifest.weight_only.items() if k != "awq"}
        model = as_exported(model, dataclasses.replace(manifest, weight_only=plain))
    elif manifest is not None and manifest.weight_only and judged == "artefact":
        model = as_exported(model, manifest)  # the 4-bit weights' reference in the yardstick's dtype
    return torch_subject(model, states, name=spec.name)


def _reference_name(manifest: Manifest) -> str:
    if (manifest.weight_only or {}).get("activations"):
        return f"pytorch-{manifest.weight_only['scheme']}-w4a4"
    if manifest.weight_only:
        return f"pytorch-{manifest.weight_only['scheme']}-weights"
    return "pytorch-fp8" if manifest.quantization else "pytorch"


def recipe_quality(checkpoint: str | Path, manifest: Manifest, quantized_reference, ids: torch.Tensor, mask: torch.Tensor, *, steps: int) -> Report:
    """What a recipe costs (DESIGN.md §8): the quantized reference against the unquantized fp32 truth,
    on the same prompts. FP8 (`hybridtrt.judge` ``fp8-recipe``): the yardstick is the same layers
    quantized at ideal per-call scales (nothing calibrated), so a calibrated scale that clips fails.
    INT4 (``int4-recipe``): the yardstick is the same layers rounded to nearest, so AWQ scales that cost
    more than plain rounding fail. The artefact computes the quantized reference within its own
    gates, so this is its quality too."""
    from hybridtrt.validation.runner import decode_phase, prefill_phase, routing_phase

    precision = "fp8-recipe" if manifest.quantization else "int4-recipe"
    return validate(
        torch_subject(quantized_reference, name=_reference_name(manifest)),
        torch_subject(load_model(checkpoint, "fp32")),
        ids,
        mask,
        precision=precision,
        steps=steps,
        phases=[prefill_phase, decode_phase, routing_phase],
        yardstick=yardstick_subject(checkpoint, precision, manifest=manifest),
    )


def _against_hf(checkpoint, prompts, random_n, steps, per_layer, seed, yardstick: bool = True, prompt_length: int | None = None) -> Report:
    """Our reference (the backend here) against HF transformers in fp32 (the truth), with HF's own fp64
    run as the yardstick (`hybridtrt.judge.yardsticks`), and the known per-release differences noted."""
    from hybridtrt.validation.hf import hf_differences, load_hf

    model = load_model(checkpoint, "fp32")
    ids, mask = _prompts(model, checkpoint, prompts, random_n, seed, prompt_length)
    theirs = hf_subject(load_hf(checkpoint), model.config.pattern)
    yard = yardstick_subject(checkpoint, "fp32", judged="reference") if yardstick else None
    report = validate(torch_subject(model), theirs, ids, mask, precision="fp32", steps=steps, per_layer=per_layer, yardstick=yard)
    report.pattern = model.config.pattern
    report.notes.extend(hf_differences(checkpoint, model.config.time_step_limit))
    return report


def _backend_subject(export_dir, manifest: Manifest, backend: str, engine):
    if backend == "ort":
        from hybridtrt.runtime.onnxruntime import OrtModel

        return ort_subject(OrtModel(export_dir, bf16="emulate"))  # judged as a bf16 executor computes it
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
    from hybridtrt.graphs.held_routing import router_outputs
    from hybridtrt.validation.recorded import check_matching, load_feeds, load_results, recorded_routing, reference_outputs, validate_recorded

    inputs = list(load_inputs) if load_inputs else [default_inputs(export_dir, load_outputs)]
    feeds = load_feeds(inputs)
    name, iterations = load_results(load_outputs, runner)
    check_matching(feeds, iterations)
    model = as_exported(load_model(checkpoint, "fp32"), manifest)  # an FP8 export: the FP8 reference
    taps = layer_taps(export_dir, manifest)
    routing = recorded_routing(iterations, router_outputs(taps.model_path), feeds)
    expected, own = reference_outputs(model, manifest, feeds, routing)
    report = validate_recorded(
        feeds, name, iterations, expected, taps, precision=precision_of(manifest), per_layer=per_layer, routing=routing, reference_routing=own
    )
    report.notes.append(f"recorded outputs: {', '.join(map(str, load_outputs))}; inputs: {', '.join(map(str, inputs))}")
    if routing is None and any(entry.get("kind") == "moe" for entry in manifest.layers):
        report.notes.append(
            "MoE routing is not held: the recording has no router TopK outputs (record with the `--onnx-outputs` command "
            "`hybridtrt compare` prints), so a choice that flips on a near-tie counts against the rel-L2 gates of every later tensor"
        )
    return report, model

