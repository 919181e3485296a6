"""The polygraphy bridge: our reference as polygraphy data, polygraphy's Comparator as the judge.

Writes the inputs as polygraphy input JSON (a list of feed dicts) and the PyTorch reference's
outputs as polygraphy ``RunResults`` JSON, so that the printed

    polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs reference.json

passes unmodified (and ``--trt --plugins LIB`` on a TensorRT machine, LIB being the autoreg shim
beside libhybridtrt_trt.so: polygraphy's ``--plugins`` only dlopens, see
`hybridtrt.plugins.dlopen_library`). Two iterations: a prefill
from zero states, then one decode step fed with the reference's present states; the same
iterations one per file (``inputs.prefill.json``, ``inputs.decode.json``) for an engine built with
one profile per phase. The printed commands also record a backend's outputs on a machine without
PyTorch (``--save-outputs``, with the layer outputs via ``--onnx-outputs`` when asked) for
``hybridtrt validate --load-outputs`` here. Every printed line is quoted with ``shlex.join``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hybridtrt.errors import ArtefactError, InputError
from hybridtrt.exporter.io import ATTENTION_MASK, INPUT_IDS, state_specs
from hybridtrt.exporter.manifest import Manifest, read_manifest
from hybridtrt.exporter.wrapper import GraphModule, flat_from_cache
from hybridtrt.runtime.onnxruntime import to_numpy
from hybridtrt.validation.runner import random_prompts
from hybridtrt.judge.tolerances import gate, polygraphy_tolerance, precision_of

REFERENCE_RUNNER = "pytorch-reference"


#: Files `write_polygraphy_data` writes (per-profile inputs serve a built two-profile engine).
INPUTS, REFERENCE = "inputs.json", "reference.json"
PROFILE_INPUTS = {0: "inputs.prefill.json", 1: "inputs.decode.json"}  # engine profile -> its iterations


@dataclass
class BridgeFiles:
    """What `write_polygraphy_data` wrote, and the command lines that reproduce the comparison.

    Attributes:
        argv: ``{name: argument list}``; ``commands`` holds the same lines quoted for a POSIX shell
            (``shlex.join``), so ``shlex.split(commands[k]) == argv[k]``.
        onnx_outputs: Tensors the save-outputs commands record (graph outputs, then layer outputs
            when ``per_layer``, then each MoE router's ``TopK`` indices): empty for a dense
            export without ``per_layer``.
        per_layer: The layer outputs are among them (``validate --load-outputs --per-layer``).
    """

    inputs: Path
    reference: Path
    model: Path
    #: polygraphy's absolute tolerance: one number, or ``{output: atol}`` (see `gate_tolerances`).
    atol: float | dict[str, float]
    rtol: float
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    export_dir: Path | None = None
    onnx_outputs: list[str] = field(default_factory=list)
    per_layer: bool = False
    #: The MoE routers' TopK indices tensors among ``onnx_outputs`` (`hybridtrt.graphs.held_routing`).
    routers: list[str] = field(default_factory=list)
    argv: dict[str, list[str]] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    #: polygraphy's ``check_error_stat``: ``"mean"`` with gate-derived tolerances, ``"elemwise"`` otherwise.
    check_error_stat: str = "elemwise"

    @property
    def profile_inputs(self) -> dict[int, Path]:
        return {k: self.inputs.parent / name for k, name in PROFILE_INPUTS.items()}

    def tolerance_args(self) -> list[str]:
        """``--check-error-stat … --atol … --rtol …`` for ``polygraphy run``."""
        atol = [f"{self.atol:g}"] if not isinstance(self.atol, dict) else [f"{name}:{value:.3g}" for name, value in self.atol.items()]
        return ["--check-error-stat", self.check_error_stat, "--atol", *atol, "--rtol", f"{self.rtol:g}"]

    def describe_tolerance(self) -> str:
        """What polygraphy checks, in a few words."""
        if isinstance(self.atol, dict):
            return "per output: mean |Δ| ≤ gate × rms(reference)"
        return f"elementwise: atol {self.atol:g} or rtol {self.rtol:g}"


#: The iterations `write_polygraphy_data` writes, by index.
ITERATIONS = ("prefill", "decode")


def _gate_kind(name: str) -> str:
    """The gate kind (`hybridtrt.judge.tolerances`) of a graph output; each iteration is one call."""
    if name.startswith("present"):
        return "state"
    return "layer" if name.startswith("layer_output.") else "call"


def gate_tolerances(precision: str, outputs: list[dict[str, np.ndarray]]) -> tuple[float | dict[str, float], float, str]:
    """``(atol, rtol, check_error_stat)`` for polygraphy, derived from the precision's gates.

    A gate bounds an output's rel L2, ``‖a − b‖ / ‖b‖ ≤ bound`` (here the floor of its kind: no
    yardstick runs for these files). polygraphy has no rel L2, but its ``mean`` statistic says the
    same in its own terms: ``mean |a − b| ≤ rms(a − b) = rel L2 × rms(b)``, so an output whose gate
    holds in every iteration has ``mean |a − b| ≤ bound × rms(b)``, ``rms(b)`` the reference's
    largest over the iterations. That is the output's atol, with rtol 0 (only the atol decides): the
    check never fails where the gate passes, and fails within a small factor of where it fails. No
    elementwise atol can follow the gate: with the presets' random weights the layer outputs reach
    |x| ≈ 10⁴, where fp32 reordering alone leaves 10⁻² on elements near zero (rel L2 2·10⁻⁶).
    A precision whose gates bound no rel L2 would keep the table's elementwise ``polygraphy``
    tolerances (none does: FP8 outputs are judged against the FP8 reference by rel L2 too).
    """
    bounds = {name: gate(precision, _gate_kind(name)).max_rel_l2 for name in outputs[0]}
    if any(b is None for b in bounds.values()):
        atol, rtol = polygraphy_tolerance(precision)
        return atol, rtol, "elemwise"
    atol = {}
    for name, bound in bounds.items():
        rms = max(float(np.sqrt(np.mean(np.square(np.asarray(o[name], dtype=np.float64))))) for o in outputs)
        atol[name] = bound * rms if np.isfinite(rms) and rms > 0 else bound
    return atol, 0.0, "mean"


def _feeds_and_reference(model, manifest: Manifest, batch: int, seed: int):
    specs = state_specs(model.config)
    graph = GraphModule(model, manifest.logits, decode=False, per_layer=bool(manifest.per_layer_outputs), hidden=manifest.hidden_states).eval()
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


def write_polygraphy_data(
    export_dir: str | Path,
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    batch: int = 2,
    seed: int = 0,
    plugins: str | Path | None = None,
    per_layer: bool = False,
    force: bool = False,
) -> BridgeFiles:
    """Write ``inputs.json`` (+ one file per engine profile) and ``reference.json`` (RunResults).

    Args:
        export_dir: ``hybridtrt export`` output.
        checkpoint: Its source checkpoint (default: the one in ``hybridtrt.json``; checked against
            the recorded sha256 first, see `hybridtrt.validation.provenance`).
        out_dir: Where to write.
        batch: Rows of random prompts.
        seed: Their seed.
        plugins: TensorRT plugin library named in the printed ``--trt`` commands.
        per_layer: The printed save-outputs commands also record every located layer output
            (``--onnx-outputs``), for ``hybridtrt validate --load-outputs --per-layer``.
        force: Compare with a checkpoint other than the export's source (same graph I/O).
    """
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    from hybridtrt.models.loading import load_model
    from hybridtrt.validation.provenance import check_checkpoint

    if batch < 1:
        raise InputError(f"--batch must be ≥ 1, got {batch}", fix="e.g. --batch 2")
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    checkpoint = checkpoint or manifest.source["checkpoint"]
    if not Path(checkpoint).is_dir():
        raise ArtefactError(f"checkpoint {checkpoint} does not exist", fix="pass --checkpoint CKPT_DIR")
    check_checkpoint(manifest, export_dir, checkpoint, force=force)
    from hybridtrt.exporter.fp8_reference import as_exported

    feeds, outputs = _feeds_and_reference(as_exported(load_model(checkpoint, "fp32"), manifest), manifest, batch, seed)  # FP8: the FP8 reference
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atol, rtol, stat = gate_tolerances(precision_of(manifest), outputs)
    files = BridgeFiles(out / INPUTS, out / REFERENCE, export_dir / manifest.graphs["unified"].file, atol, rtol, feeds, export_dir, check_error_stat=stat)
    from hybridtrt.graphs.held_routing import router_outputs
    from hybridtrt.validation.layers import layer_taps

    taps = layer_taps(export_dir, manifest)
    routers = list(router_outputs(taps.model_path).values())  # MoE: the routing the recording makes
    files.per_layer, files.routers = per_layer, routers
    if per_layer or routers:
        tensors = list(taps.tensors.values()) if per_layer else []
        files.onnx_outputs = taps.outputs + [t for t in tensors + routers if t not in taps.outputs]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        save_json(feeds, str(files.inputs), description="hybridtrt inputs")
        for profile, path in files.profile_inputs.items():
            save_json([feeds[profile]], str(path), description=f"hybridtrt inputs, engine profile {profile}")
        results = RunResults()
        results.append((REFERENCE_RUNNER, [IterationResult(o, runner_name=REFERENCE_RUNNER) for o in outputs]))
        results.save(str(files.reference))
    files.argv = command_lines(files, plugins)
    files.commands = {name: shlex.join(argv) for name, argv in files.argv.items()}
    return files


def _shape_args(flag: str, shapes: dict[str, np.ndarray]) -> list[str]:
    return [flag, *(f"{n}:[{','.join(str(int(x)) for x in d)}]" for n, d in shapes.items())]


def command_lines(files: BridgeFiles, plugins: str | Path | None = None) -> dict[str, list[str]]:
    """The command lines that reproduce and extend the comparison, as argument lists.

    - ``onnxrt`` / ``trt``: polygraphy compares ONNX Runtime / a TensorRT engine it builds from
      ``model.onnx`` (one profile covering every iteration) with the reference outputs;
    - ``trt-save`` (``onnxrt-save``): the same TensorRT (ONNX Runtime) run, saving its outputs
      (``trt.json``, ``onnxrt.json``) for ``hybridtrt validate --load-outputs`` on a machine with
      PyTorch (``--onnx-outputs`` adds the layer outputs when per-layer tensors were asked for);
    - ``engine-prefill`` / ``engine-decode``: a two-profile engine from ``hybridtrt build`` run
      profile by profile on its own iterations, and ``validate-engine`` reading both back;
    - ``validate``: reads ``trt.json`` back here.
    """
    model, out = str(files.model), files.inputs.parent
    tol = files.tolerance_args()
    plugin_args = []
    if plugins:
        from hybridtrt.plugins import dlopen_library

        plugin_args = ["--plugins", str(dlopen_library(plugins))]  # polygraphy --plugins only dlopens
    names = list(files.feeds[0])
    lo = {n: np.minimum.reduce([np.array(f[n].shape) for f in files.feeds]) for n in names}
    hi = {n: np.maximum.reduce([np.array(f[n].shape) for f in files.feeds]) for n in names}
    build = ["--trt", "--strongly-typed", *plugin_args, *_shape_args("--trt-min-shapes", lo), *_shape_args("--trt-opt-shapes", hi), *_shape_args("--trt-max-shapes", hi)]
    compare = ["--load-inputs", str(files.inputs), "--load-outputs", str(files.reference), *tol]
    record = ["--onnx-outputs", *files.onnx_outputs] if files.onnx_outputs else []
    per_layer = ["--per-layer"] if files.per_layer else []
    export_dir = str(files.export_dir or files.model.parent)
    trt_json = str(out / "trt.json")
    engine = str(files.model.parent / "model.engine")
    load = ["--load-inputs", str(files.inputs)]
    lines = {
        "onnxrt": ["polygraphy", "run", model, "--onnxrt", *compare],
        "trt": ["polygraphy", "run", model, *build, *compare],
        "onnxrt-save": ["polygraphy", "run", model, "--onnxrt", *record, *load, "--save-outputs", str(out / "onnxrt.json")],
        "trt-save": ["polygraphy", "run", model, *build, *record, *load, "--save-outputs", trt_json],
        "validate": ["hybridtrt", "validate", export_dir, "--load-outputs", trt_json, *load, *per_layer],
    }
    saved = {}
    for profile, path in files.profile_inputs.items():
        saved[profile] = str(out / f"trt.{'prefill' if profile == 0 else 'decode'}.json")
        lines[f"engine-{'prefill' if profile == 0 else 'decode'}"] = [
            "polygraphy", "run", engine, "--model-type", "engine", "--trt", *plugin_args,
            "--optimization-profile", str(profile), "--load-inputs", str(path), "--save-outputs", saved[profile],
        ]  # fmt: skip
    lines["validate-engine"] = [
        "hybridtrt", "validate", export_dir, "--load-outputs", *saved.values(), "--load-inputs", *map(str, files.profile_inputs.values()),
    ]  # fmt: skip
    return lines


@dataclass
class PolygraphyVerdict:
    """polygraphy's Comparator on one runner: which outputs failed, in which iteration, and why."""

    runner: str
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed


def _why(name: str, result: object, files: BridgeFiles) -> str:
    """Why polygraphy's result for output ``name`` failed, in the terms it checked."""
    atol = files.atol.get(name) if isinstance(files.atol, dict) else files.atol
    stat = files.check_error_stat
    mean, peak = getattr(result, "mean_absdiff", None), getattr(result, "max_absdiff", None)
    if mean is None or peak is None:  # a missing output or a shape mismatch: polygraphy gives a bare False
        return f"{name}: missing or misshapen in the runner's outputs"
    if not (np.isfinite(float(mean)) and np.isfinite(float(peak))):
        return f"{name}: non-finite difference (NaN/Inf)"
    if stat == "mean":
        return f"{name}: mean |Δ| {float(mean):.3g} > atol {atol:.3g} (its {_gate_kind(name)} gate's rel L2 × the reference's rms); max |Δ| {float(peak):.3g}"
    return f"{name}: |Δ| up to {float(peak):.3g} over atol {atol:g} where the relative error is also over rtol {files.rtol:g}"


def compare_with_polygraphy(files: BridgeFiles, *, trt: bool = False, plugins: str | Path | None = None) -> dict[str, PolygraphyVerdict]:
    """Run polygraphy's Comparator: ONNX Runtime (and TensorRT when asked) vs the loaded reference,
    with the tolerances `write_polygraphy_data` derived (`gate_tolerances`).

    Returns ``{runner_name: verdict}``; a verdict is truthy when every output of every iteration
    passed, and otherwise lists each failed output with its iteration, statistic and tolerance.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    runners = [] if onnxrt_cannot_run(files.model) else [OnnxrtRunner(SessionFromOnnx(str(files.model), providers=["CPUExecutionProvider"]), name="onnxrt")]
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

    if not runners:
        return {}
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        run = Comparator.run(runners, data_loader=files.feeds)
    return judge(files, run)


def onnxrt_cannot_run(model_path: str | Path) -> str | None:
    """Why stock ONNX Runtime's CPU provider, as ``polygraphy --onnxrt`` runs the file, cannot run
    the graph (None when it can): it has no bf16 kernels (``Where(16)`` is the first it meets) and no
    float4e2m1 DequantizeLinear. `hybridtrt validate` runs both, emulated (`hybridtrt.runtime.onnxruntime`)."""
    import onnx

    from hybridtrt.graphs.bf16_emulation import graph_has_bf16
    from hybridtrt.graphs.fp4_emulation import graph_has_fp4

    graph = onnx.load(str(model_path), load_external_data=False)
    missing = [what for what, has in (("bf16", graph_has_bf16(graph)), ("float4e2m1 DequantizeLinear", graph_has_fp4(graph))) if has]
    return f"ONNX Runtime's CPU provider has no {' or '.join(missing)} kernels" if missing else None


def judge(files: BridgeFiles, run) -> dict[str, PolygraphyVerdict]:  # noqa: ANN001 - polygraphy RunResults
    """polygraphy's ``Comparator.compare_accuracy`` of the runs in ``run`` (RunResults) against the
    reference outputs in ``files.reference``, with ``files``' tolerances: a verdict per runner."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    # polygraphy's own log is silenced (its per-output lines would interleave with the CLI's); the
    # verdicts below name every failed output. Its log statistics overflow float32 on the presets'
    # large random-weight activations (a warning only).
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.errstate(over="ignore"):
        reference = RunResults.load(str(files.reference))
        for name, iterations in run.items():
            reference.append((name, iterations))
        func = SimpleCompareFunc(atol=files.atol, rtol=files.rtol, check_error_stat=files.check_error_stat)
        results = Comparator.compare_accuracy(reference, compare_func=func)
    # One comparison function -> one AccuracyResult: {(reference, runner): [{output: result}]}.
    verdicts = {}
    for pair, iterations in results[0].items():
        verdict = PolygraphyVerdict(pair[1])
        for i, iteration in enumerate(iterations):
            where = ITERATIONS[i] if i < len(ITERATIONS) else f"iteration {i}"
            verdict.failures += [f"{where}: {_why(name, result, files)}" for name, result in iteration.items() if not bool(result)]
        verdicts[pair[1]] = verdict
    return verdicts
