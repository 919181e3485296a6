"""The polygraphy bridge: our reference as polygraphy data, polygraphy's Comparator as the judge.

Writes the inputs as polygraphy input JSON (a list of feed dicts) and the PyTorch reference's
outputs as polygraphy ``RunResults`` JSON, so that the printed

    polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs reference.json

passes unmodified (and ``--trt --plugins LIB`` on a TensorRT machine, LIB being the autoreg shim beside
libhybridtrt_trt.so: polygraphy's ``--plugins`` only dlopens, `hybridtrt.plugins.dlopen_library`). Two iterations: a prefill
from zero states, then one decode step fed with the reference's present states.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hybridtrt.exporter.io import ATTENTION_MASK, INPUT_IDS
from hybridtrt.exporter.manifest import Manifest, read_manifest
from hybridtrt.exporter.wrapper import GraphModule, flat_from_cache
from hybridtrt.exporter.io import state_specs
from hybridtrt.models.loading import load_model
from hybridtrt.runtime.onnxruntime import to_numpy
from hybridtrt.validation.runner import random_prompts
from hybridtrt.validation.tolerances import polygraphy_tolerance, precision_of

REFERENCE_RUNNER = "pytorch-reference"


@dataclass
class BridgeFiles:
    """What `write_polygraphy_data` wrote, and the commands that reproduce the comparison."""

    inputs: Path
    reference: Path
    model: Path
    atol: float
    rtol: float
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)


def _feeds_and_reference(manifest: Manifest, checkpoint: str | Path, batch: int, seed: int):
    model = load_model(checkpoint, "fp32")
    specs = state_specs(model.config)
    graph = GraphModule(model, manifest.logits, decode=False, per_layer=bool(manifest.per_layer_outputs)).eval()
    out_names = [o["name"] for o in manifest.graphs["unified"].outputs]
    in_dtypes = {i["name"]: np.dtype(i["dtype"]) for i in manifest.graphs["unified"].inputs}
    ids, mask = random_prompts(batch, model.config.vocab_size, seed=seed, max_len=24)
    states = flat_from_cache(specs, model.new_cache(batch))
    feeds, outputs = [], []
    for _ in range(2):  # prefill, then one decode step on the reference's states
        with torch.no_grad():
            result = graph(ids, mask, *states)
        feed = {INPUT_IDS: ids.numpy(), ATTENTION_MASK: mask.numpy()}
        feed.update({s.past_name: to_numpy(t) for s, t in zip(specs, states)})
        feeds.append({k: v.astype(in_dtypes[k]) for k, v in feed.items()})
        outputs.append({name: to_numpy(t) for name, t in zip(out_names, result)})
        logits = result[0] if result[0].dim() == 2 else result[0][:, -1]
        ids = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        states = list(result[1 : 1 + len(specs)])
    return feeds, outputs


def write_polygraphy_data(export_dir: str | Path, checkpoint: str | Path | None, out_dir: str | Path, *, batch: int = 2, seed: int = 0, plugins: str | Path | None = None) -> BridgeFiles:
    """Write ``inputs.json`` and ``reference.json`` (RunResults) into ``out_dir``."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    checkpoint = checkpoint or manifest.source["checkpoint"]
    feeds, outputs = _feeds_and_reference(manifest, checkpoint, batch, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = BridgeFiles(out / "inputs.json", out / "reference.json", export_dir / manifest.graphs["unified"].file, *polygraphy_tolerance(precision_of(manifest)), feeds)
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        save_json(feeds, str(files.inputs), description="hybridtrt inputs")
        results = RunResults()
        results.append((REFERENCE_RUNNER, [IterationResult(o, runner_name=REFERENCE_RUNNER) for o in outputs]))
        results.save(str(files.reference))
    files.commands = commands(files, feeds, plugins)
    return files


def commands(files: BridgeFiles, feeds: list[dict[str, np.ndarray]], plugins: str | Path | None = None) -> dict[str, str]:
    """The ``polygraphy run`` command lines that reproduce the comparison."""
    q = shlex.quote
    common = f"--load-inputs {q(str(files.inputs))} --load-outputs {q(str(files.reference))} --atol {files.atol:g} --rtol {files.rtol:g}"
    cmds = {"onnxrt": f"polygraphy run {q(str(files.model))} --onnxrt {common}"}
    # TensorRT needs a profile covering every iteration's shapes.
    names = list(feeds[0])
    lo = {n: np.minimum.reduce([np.array(f[n].shape) for f in feeds]) for n in names}
    hi = {n: np.maximum.reduce([np.array(f[n].shape) for f in feeds]) for n in names}
    shape = lambda d: " ".join(f"{n}:[{','.join(str(int(x)) for x in d[n])}]" for n in names)  # noqa: E731
    trt = f"polygraphy run {q(str(files.model))} --trt --strongly-typed"
    if plugins:
        from hybridtrt.plugins import dlopen_library

        trt += f" --plugins {q(str(dlopen_library(plugins)))}"  # polygraphy --plugins only dlopens
    trt += f" --trt-min-shapes {shape(lo)} --trt-opt-shapes {shape(hi)} --trt-max-shapes {shape(hi)} {common}"
    cmds["trt"] = trt
    return cmds


def compare_with_polygraphy(files: BridgeFiles, *, trt: bool = False, plugins: str | Path | None = None) -> dict[str, bool]:
    """Run polygraphy's Comparator: ONNX Runtime (and TensorRT when asked) vs the loaded reference.

    Returns ``{runner_name: passed}``.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc

    runners = [OnnxrtRunner(SessionFromOnnx(str(files.model), providers=["CPUExecutionProvider"]), name="onnxrt")]
    if trt:
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

        profile = Profile()
        for name in files.feeds[0]:
            shapes = [f[name].shape for f in files.feeds]
            profile.add(name, min=np.minimum.reduce(shapes), opt=np.maximum.reduce(shapes), max=np.maximum.reduce(shapes))
        network = NetworkFromOnnxPath(str(files.model), strongly_typed=True, plugin_instancenorm=False)
        if plugins:
            from polygraphy.backend.trt import LoadPlugins

            from hybridtrt.plugins import dlopen_library

            network = LoadPlugins(plugins=[str(dlopen_library(plugins))], obj=network)  # ctypes.CDLL: needs the autoreg shim
        runners.append(TrtRunner(EngineFromNetwork(network, config=CreateConfig(profiles=[profile])), name="trt"))
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        run = Comparator.run(runners, data_loader=files.feeds)
        reference = RunResults.load(str(files.reference))
        for name, iterations in run.items():
            reference.append((name, iterations))
        func = SimpleCompareFunc(atol=files.atol, rtol=files.rtol)
        results = Comparator.compare_accuracy(reference, compare_func=func)
    # One comparison function -> one AccuracyResult: {(reference, runner): [{output: result}]}.
    return {
        pair[1]: all(bool(ok) for iteration in iterations for ok in iteration.values())
        for pair, iterations in results[0].items()
    }
