"""What TensorRT's ONNX parser does with an exported graph, by TensorRT version — data only, one place.

The tables, read by `hybridtrt.engine.versions` (the gates) and `hybridtrt.engine.dispatch` (the emulator,
which applies every one of them to the graph and to every function body the parser would import):

``PARSER_RELEASES``: per release range of the ONNX parser, the newest documented default-domain opset, how a
node that has both a model-local function and a registered plugin creator is imported, and whether local
functions whose value names alias an outer scope are mishandled.

``NATIVE_OPS``: standard ONNX ops the parser builds as a dedicated TensorRT layer only from some version on;
their importers' own refusals are `hybridtrt.engine.native_layers`.

``OP_RULES``: per standard op, what the parser accepts before and while importing it — the element types of
docs/operators.md ("Supported Types") and the attributes the static checker (``onnxOpCheckers.cpp``, run on
every node, inside local-function bodies too, before anything of the model is imported) or the operators.md
restrictions refuse. An op without a row is not type-checked.

Sources, checked for this table (onnx/onnx-tensorrt and NVIDIA/TensorRT, both public):
- ModelImporter.cpp ``parseNode`` at 10.0-GA / 10.1-GA: builtin importer, else ``LocalFunctionImporter``,
  else ``FallbackPluginImporter`` — a registered plugin is never consulted for a node that has a local
  function (NVIDIA/TensorRT#4113).
- Changelog 10.7: "Now prioritizes using plugins over local functions when a corresponding plugin is
  available in the registry"; the 10.7-era ``parseNode``: builtin, else (local function: plugin if
  ``isNodeInPluginRegistry`` else the function), else fallback plugin.
- Changelog 10.15: ``kENABLE_PLUGIN_OVERRIDE``; the 10.15+ ``parseNode``: if the flag is set or the node has a
  ``plugin_namespace`` attribute, and the registry has (op_type, plugin_version [default "1"],
  plugin_namespace [default ""]): the plugin; otherwise builtin, local function, then fallback plugin only for
  nodes without the attribute ("local function will be preferred over plugin if the flag is unset").
- Changelog 10.8: "Fixed the import of local functions when their input tensor names aliased one from an
  outside scope".
- Opsets: docs/operators.md "opset 9 to opset 20" (10.0-GA, 10.1-GA), "opset 9 to opset 24" (10.15);
  the bundled ONNX release of the changelog bounds the releases in between (10.6: ONNX 1.17 = opset 22;
  10.11: ONNX 1.18 = opset 23); 11.5 release notes: "Added support for ONNX opset 25".
- ``loadFields`` (onnxOpImporters.cpp): only fields listed by the creator's ``getFieldNames`` are passed,
  INT attributes as ``kINT32``, ``plugin_version`` / ``plugin_namespace`` are read as STRING attributes.
- Static checker: onnx-tensorrt ``onnxOpCheckers.cpp`` at the parser commits TensorRT pins as ``parsers/onnx``
  (v10.14 c72727708d4e, v11.0 5ab48c5c436a; the 10.15-era dd0a3a9f8794 reads the same for these ops):
  ``DEFINE_OP_CHECKER(Attention)`` refuses ``softcap != 0`` ("Setting softcap is not supported in TensorRT
  Attention.") and a ``softmax_precision`` attribute of any value (``attrs.count("softmax_precision")``:
  "Setting softmax precision is not supported in TensorRT Attention."); ``Cast`` refuses a ``to`` that
  ``convertDtype`` cannot map; 11.0 adds ``ScatterElements`` (``reduction`` one of none/add/mul/max/min).
  ``DEFINE_OP_CHECKER(LocalFunctionImporter)`` runs ``parseNodeStaticCheck`` on every node of the function
  body; ``ModelImporter.cpp`` ``parseGraph`` stops importing at the first static error, so one refused node
  fails the whole parse.
- Types: docs/operators.md of TensorRT 10.15 ("opset 9 to opset 24"; no 11.x edition is published in the
  repository), rows "Supported Types"; its notes: "INT8, INT4, FP8 and FP4 are treated as Quantized Types in
  TensorRT, where support is available only through quantization from a floating-point type with higher
  precision" — ``Cast`` lists FP32, FP16, BF16, INT32, INT64, UINT8, BOOL, so a float8 Cast is refused (the
  importer: "Ignore "saturate" attribute as TRT will reject casts to FP8"); FP8 goes through Q/DQ only. The
  rows are applied to every release (the newest published data).
- TensorRT's own ops (``TENSORRT_OPS``, domain ``trt`` as ModelOpt writes them): ``onnxOpImporters.cpp``
  (``DEFINE_BUILTIN_OP_IMPORTER(TRT_FP4DynamicQuantize)``), NvInfer.h ``addDynamicQuantize`` (TensorRT 11.1).
- Attention: operators.md (10.15) and changelog 10.14 "Added support for the Attention operator";
  TensorScatter: changelog 10.15, operators.md "past_cache and update must be 4D, axis must be -2"; the
  layers: ``INetworkDefinition::addAttention`` / ``addKVCacheUpdate`` (NvInfer.h, TensorRT 11.1), the latter
  "performs in-place updates on the cache tensor" (the runtime binds one buffer, `ICudaEngine::
  getAliasedInputTensor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Version = tuple[int, int]

#: How the parser imports a node that has a model-local function, by release.
LOCAL_FUNCTION_ALWAYS = "local function always"
#: A registered plugin with the node's name / version / namespace wins over the local function.
REGISTERED_PLUGIN_WINS = "registered plugin wins"
#: The plugin wins only when the node has a plugin_namespace attribute (or kENABLE_PLUGIN_OVERRIDE is set).
PLUGIN_NAMESPACE_WINS = "plugin_namespace attribute wins"


@dataclass(frozen=True)
class ParserRelease:
    """The ONNX parser from TensorRT ``since`` up to the next row.

    Attributes:
        since: First (major, minor) this row applies to.
        max_opset: Newest default-domain opset the release documents (or its bundled ONNX release defines). A
            policy, not a parser limit: ``ModelImporter.cpp`` only refuses opsets below 7; hybridtrt refuses a graph
            above the documented range instead of letting ops newer than the release import by older rules.
        dispatch: One of the three dispatch rules above.
        function_scope_bug: Local functions whose value names alias an outer-scope name are mishandled.
        source: Where the row comes from (see the module docstring).
    """

    since: Version
    max_opset: int
    dispatch: str
    function_scope_bug: bool
    source: str


#: Oldest TensorRT hybridtrt runs at all: IPluginV3 and strongly typed networks (TensorRT 10.0).
MIN_TENSORRT: Version = (10, 0)

#: Sorted by `since`; a version uses the last row whose `since` it reaches.
PARSER_RELEASES: tuple[ParserRelease, ...] = (
    ParserRelease((10, 0), 20, LOCAL_FUNCTION_ALWAYS, True, "10.0-GA/10.1-GA parseNode, operators.md opset 9-20"),
    ParserRelease((10, 6), 22, LOCAL_FUNCTION_ALWAYS, True, "changelog 10.6: ONNX 1.17 (opset 22)"),
    ParserRelease((10, 7), 22, REGISTERED_PLUGIN_WINS, True, "changelog 10.7: plugins prioritized over local functions"),
    ParserRelease((10, 8), 22, REGISTERED_PLUGIN_WINS, False, "changelog 10.8: local-function name aliasing fixed"),
    ParserRelease((10, 11), 23, REGISTERED_PLUGIN_WINS, False, "changelog 10.11: ONNX 1.18 (opset 23)"),
    ParserRelease((10, 15), 24, PLUGIN_NAMESPACE_WINS, False, "changelog 10.15 / parseNode: kENABLE_PLUGIN_OVERRIDE; operators.md opset 9-24"),
    ParserRelease((11, 5), 25, PLUGIN_NAMESPACE_WINS, False, "11.5 release notes: ONNX opset 25"),
)


@dataclass(frozen=True)
class NativeOp:
    """A standard ONNX op the parser builds as a dedicated TensorRT layer from some release on.

    Attributes:
        op_type: Default-domain op type.
        layer: The TensorRT layer it becomes.
        since: First TensorRT (major, minor) whose parser imports it.
        min_opset: The op's first ONNX opset.
        restrictions: operators.md's restriction text (documentation: the importer's rules are
            `hybridtrt.engine.native_layers.IMPORTER_RULES`).
    """

    op_type: str
    layer: str
    since: Version
    min_opset: int
    restrictions: str = ""


NATIVE_OPS: dict[str, NativeOp] = {
    op.op_type: op
    for op in (
        NativeOp("Attention", "IAttention", (10, 14), 23,
                 "Q, K, V and attn_mask 4D; no past_key/past_value/present_* or qk_matmul_output"),
        NativeOp("TensorScatter", "IKVCacheUpdateLayer", (10, 15), 24,
                 "past_cache and update 4D, axis -2; the output aliases the cache input (one buffer)"),
    )
}  # fmt: skip


#: TensorRT's names (operators.md) of the ONNX element types (``onnx.TensorProto.DataType`` names).
TRT_TYPE_NAMES: dict[str, str] = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "DOUBLE", "FLOAT8E4M3FN": "FP8",
    "FLOAT8E4M3FNUZ": "FP8 E4M3FNUZ", "FLOAT8E5M2": "FP8 E5M2", "FLOAT8E5M2FNUZ": "FP8 E5M2FNUZ", "FLOAT4E2M1": "FP4",
    "INT4": "INT4", "UINT4": "UINT4", "INT8": "INT8", "UINT8": "UINT8", "INT16": "INT16", "UINT16": "UINT16",
    "INT32": "INT32", "UINT32": "UINT32", "INT64": "INT64", "UINT64": "UINT64", "BOOL": "BOOL", "STRING": "STRING",
}  # fmt: skip

#: Refusal kinds of an `AttributeRule`.
PRESENT = "present"  # the attribute is refused whatever its value
NONZERO = "nonzero"  # refused unless absent or 0
NOT_ONE_OF = "not one of"  # refused unless absent (the ONNX default) or one of `allowed`


@dataclass(frozen=True)
class AttributeRule:
    """An attribute value TensorRT's parser refuses on one op.

    Attributes:
        name: The attribute.
        refuse: `PRESENT`, `NONZERO` or `NOT_ONE_OF`.
        message: What the parser says (the checker's text where it has one).
        allowed: The values `NOT_ONE_OF` accepts.
        since: First TensorRT (major, minor) that refuses it.
        source: ``"checker"`` (onnxOpCheckers.cpp: before anything is imported) or ``"operators.md"``.
        fix: What to do, when it is more than "do not set it".
    """

    name: str
    refuse: str
    message: str
    allowed: tuple[object, ...] = ()
    since: Version = (10, 0)
    source: str = "checker"
    fix: str = ""


@dataclass(frozen=True)
class OpRule:
    """What TensorRT's ONNX parser accepts of one standard op.

    Attributes:
        op_type: Default-domain op type.
        types: operators.md "Supported Types" (TensorRT names, see `TRT_TYPE_NAMES`).
        typed_inputs: The inputs whose element type the row means (the data, not indices or conditions).
        typed_to: The ``to`` attribute (Cast) must be one of `types` too.
        attributes: Attribute values refused (checker or operators.md restrictions).
        constant_inputs: Inputs operators.md requires to be build-time constants (an initializer or a
            ``Constant`` node): ``axes`` of the reductions, ``axis`` of CumSum.
    """

    op_type: str
    types: tuple[str, ...]
    typed_inputs: tuple[int, ...] = (0,)
    typed_to: bool = False
    attributes: tuple[AttributeRule, ...] = ()
    constant_inputs: tuple[int, ...] = ()


_FLOATS = ("FP32", "FP16", "BF16")
_NUMBERS = (*_FLOATS, "INT32", "INT64")
_ALL = (*_NUMBERS, "BOOL")
_CAST = (*_NUMBERS, "UINT8", "BOOL")

#: op_type -> its rule; the ops hybridtrt's graphs and function bodies use (operators.md, TensorRT 10.15).
OP_RULES: dict[str, OpRule] = {
    r.op_type: r
    for r in (
        OpRule("Attention", (*_FLOATS, "INT8", "FP8"), (0, 1, 2), attributes=(
            AttributeRule("softmax_precision", PRESENT, "Setting softmax precision is not supported in TensorRT Attention.", since=(10, 14),
                          fix="re-export with this hybridtrt, which no longer writes the attribute (ONNX Runtime computes the same)"),
            AttributeRule("softcap", NONZERO, "Setting softcap is not supported in TensorRT Attention.", since=(10, 14)),
        )),
        OpRule("TensorScatter", (*_FLOATS, "INT32"), (0, 1)),
        OpRule("Cast", _CAST, typed_to=True),
        OpRule("CastLike", _CAST, (0, 1)),
        OpRule("QuantizeLinear", _FLOATS),
        OpRule("DequantizeLinear", ("INT8", "FP8", "FP4", "INT4")),
        OpRule("Conv", _FLOATS),
        OpRule("CumSum", _FLOATS, constant_inputs=(1,)),
        OpRule("Softplus", _FLOATS),
        OpRule("MatMul", _FLOATS, (0, 1)),
        *(OpRule(op, _FLOATS) for op in ("Reciprocal", "Sqrt", "Sigmoid", "Exp")),
        OpRule("TopK", _NUMBERS, attributes=(AttributeRule("sorted", NOT_ONE_OF, "`sorted` must be 1", (1,), source="operators.md"),)),
        OpRule("ScatterND", _NUMBERS, attributes=(
            AttributeRule("reduction", NOT_ONE_OF, "`reduction` other than `none` is not supported", ("none",), source="operators.md"),
        )),
        OpRule("ScatterElements", _NUMBERS, attributes=(
            AttributeRule("reduction", NOT_ONE_OF, "ScatterElements reduction attribute must be one of: none, add, mul, max, min.",
                          ("none", "add", "mul", "max", "min"), since=(11, 0)),
        )),
        *(OpRule(op, _NUMBERS) for op in ("Pad", "Range", "Pow", "Relu")),
        *(OpRule(op, _NUMBERS, constant_inputs=(1,)) for op in ("ReduceProd", "ReduceMax", "ReduceSum", "ReduceMean")),
        *(OpRule(op, _NUMBERS, (0, 1)) for op in ("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Div", "Sub", "Mul", "Add")),
        *(OpRule(op, _NUMBERS, (0, 1)) for op in ("Min", "Max")),
        *(OpRule(op, ("BOOL",), (0, 1)) for op in ("And", "Or")),
        OpRule("Not", ("BOOL",)),
        OpRule("Where", _ALL, (1, 2)),
        *(OpRule(op, _ALL) for op in ("GatherElements", "Gather", "Split", "Slice", "Squeeze", "Unsqueeze", "Expand",
                                      "Shape", "Reshape", "Transpose", "Concat")),
    )
}  # fmt: skip

@dataclass(frozen=True)
class DequantizeRule:
    """What TensorRT builds of a ``DequantizeLinear`` whose input is one quantized type (weights).

    Attributes:
        kind: The input type (TensorRT name: ``"INT4"``, ``"FP4"``).
        since: First TensorRT whose parser takes the type.
        blocked_since: First TensorRT that builds a blocked (``block_size``) DequantizeLinear of it.
        block_sizes: The documented block sizes (empty: any that divides the blocked dimension).
        constant_until: Before this TensorRT the input must be a build-time constant (weights).
        hardware: What GPUs TensorRT documents it for, and what is not verified.
        sources: Where each fact is read.
    """

    kind: str
    since: Version
    blocked_since: Version
    block_sizes: tuple[int, ...]
    constant_until: Version | None
    hardware: str
    sources: tuple[str, ...]


#: 4-bit weights (`hybridtrt.graphs.weight_only`). Rules shared by every blocked DequantizeLinear,
#: checked by the emulator (`hybridtrt.engine.dispatch`): the scale has the input's rank, at most 2
#: (NvInfer.h, IDequantizeLayer: "rank lower or equal to 2"); blocking on one of the last two
#: dimensions ("except for one dimension (the last or second to last dimension) in which blocking
#: occurs"); the parser infers the block from the shapes and refuses a partial last block
#: (onnxOpImporters.cpp ``QuantDequantLinearHelper``: "Inferred block size is not an integer."); the zero
#: point absent or zeros (NvInfer.h: "zeroPt must only contain zero-valued coefficients, because only
#: symmetric quantization is supported"); a 4-bit tensor has an even number of elements
#: (onnxOpImporters.cpp: "4-bit quantization requies an even number of elements").
DEQUANTIZE_RULES: dict[str, DequantizeRule] = {
    r.kind: r
    for r in (
        DequantizeRule(
            "INT4", (10, 0), (10, 0), (64, 128), (10, 13),
            "weight-only on every GPU TensorRT 10 supports (docs: \"INT4 (signed 4-bit integer, weight-only quantization)\")",
            ("CHANGELOG.md 10.0: \"Added support for INT4 quantization\"",
             "NvInfer.h 10.0 IDequantizeLayer: \"Block dequantization is supported only for 2-D input tensors with DataType::kINT4 that are rooted at an IConstantLayer\"; 10.13: no longer \"rooted at an IConstantLayer\"",
             "docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-schemes.html: \"The supported block sizes are {64, 128}\""),
        ),
        DequantizeRule(
            "FP4", (10, 8), (10, 13), (16,), None,
            "Blackwell (SM100+) per ModelOpt (examples/torch_onnx/README.md: \"NVFP4 requires a Blackwell GPU (SM100+) and "
            "TensorRT 10.11 or later\"); FP4 weights with bf16/fp16 GEMMs on Hopper are not verified (TensorRT's "
            "demo/Diffusion/README.md: FP4 pipelines \"supported on Hopper/Ada/Blackwell devices\")",
            ("CHANGELOG.md 10.8: \"Added support for FLOAT4E2M1 types for quantized networks\"",
             "NvInfer.h 10.13 IDequantizeLayer: \"Block dequantization is supported for input types DataType::kFP4, DataType::kFP8 and DataType::kINT4\"",
             "NVFP4: 16 values per FP8 scale (ModelOpt's nvfp4_exporter.py writes block_size=16 only)"),
        ),
    )
}  # fmt: skip

@dataclass(frozen=True)
class TensorRTOp:
    """One of TensorRT's own ONNX ops (ModelOpt writes them in domain ``trt``), which the parser builds
    with a builtin importer (keyed by op_type, whatever the domain), never from a function body.

    Attributes:
        op_type: The node's op_type.
        layer: The TensorRT layer it becomes.
        since: First TensorRT this table lets build it.
        block_sizes: The ``block_size`` attribute values the importer takes.
        scale_types: The ``scale_type`` attribute values (ONNX element type names) it takes.
        input_types: The element types of input 0 the layer takes (TensorRT names).
        ranks: The ranks of input 0 the layer takes; the blocked axis is one of the last two.
        hardware: What GPUs run what it feeds.
        sources: Where each fact is read.
        attributes: STRING attributes and the values its importer maps to the layer's enums.
    """

    op_type: str
    layer: str
    since: Version
    block_sizes: tuple[int, ...]
    scale_types: tuple[str, ...]
    input_types: tuple[str, ...]
    ranks: tuple[int, ...]
    hardware: str
    sources: tuple[str, ...]
    #: STRING attributes and the values the importer maps (an op without block sizes checks these).
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)


#: FP4 activations (`hybridtrt.graphs.fp4_activations`). The importer (onnx-tensorrt ``onnxOpImporters.cpp``,
#: ``DEFINE_BUILTIN_OP_IMPORTER(TRT_FP4DynamicQuantize)``): ``block_size`` must be 16 ("Only block_size == 16
#: is supported for now."), ``scale_type`` must be FP8 ("scale_type must be FP8."), input 1 must be an
#: initializer ("Scale input must be an initializer.") holding one value ("Scale input must be a scalar.");
#: ``axis`` defaults to 1. The layer (NvInfer.h ``addDynamicQuantize``, TensorRT 11.1): input FLOAT, HALF or
#: BF16, "Currently only 2D and 3D inputs are supported", the axis "must be the last or second to last
#: dimension", its extent constant and a multiple of the block. Its outputs feed the blocked FP4
#: ``DequantizeLinear`` of `DEQUANTIZE_RULES` (whose scale then has the input's rank, 3 for ``[B, T, K]``:
#: what ModelOpt exports for LLM activations, so the "rank lower or equal to 2" of IDequantizeLayer is
#: read as the constant-weights case).
TENSORRT_OPS: dict[str, TensorRTOp] = {
    op.op_type: op
    for op in (
        TensorRTOp(
            "TRT_FP4DynamicQuantize", "IDynamicQuantizeLayer", (10, 11), (16,), ("FLOAT8E4M3FN",), ("FP32", "FP16", "BF16"), (2, 3),
            "Blackwell (SM100+) only: FP4 activations feed FP4 tensor-core GEMMs (ModelOpt examples/torch_onnx/README.md: "
            "\"NVFP4 requires a Blackwell GPU (SM100+) and TensorRT 10.11 or later\"); an engine with them is not built for Hopper",
            ("ModelOpt examples/torch_onnx/README.md: \"TensorRT 10.11 or later is required to evaluate the MXFP8 or NVFP4 ONNX models\" "
             "(CHANGELOG.md 10.8 brought FLOAT4E2M1 to the parser)",
             "onnxOpImporters.cpp DEFINE_BUILTIN_OP_IMPORTER(TRT_FP4DynamicQuantize)",
             "NvInfer.h addDynamicQuantize: 2D and 3D inputs of FLOAT/HALF/BF16, blocked on the last or second to last axis"),
        ),
        TensorRTOp(
            "DistCollective", "IDistCollectiveLayer", (10, 16), (), (), ("FP32", "FP16", "BF16"), (),
            "multi-device: one engine and one process per GPU, an NCCL communicator set on each execution context "
            "(IExecutionContext::setCommunicator; NCCL >= 2.19, < 3.0: samples/sampleDistCollective/README.md)",
            ("CHANGELOG.md 10.16: \"Added DistCollective operator support for multi-device execution in TensorRT\"",
             "tools/Polygraphy/polygraphy/tools/multi_device/subtool/shard.py: collective_operation, reduce_op (STRING), root, "
             "group_size (INT), groups (INTS)",
             "NvInfer.h CollectiveOperation and ReduceOperation; addDistCollective(input, op, reduceOp, root, groups, groupSize)"),
            attributes={
                "collective_operation": ("all_reduce", "all_gather", "broadcast", "reduce", "reduce_scatter", "all_to_all", "gather", "scatter"),
                "reduce_op": ("sum", "prod", "max", "min", "avg", "none"),
            },
        ),
    )
}  # fmt: skip

#: Custom ops whose function body holds what TensorRT refuses: the fix to print when no registered creator serves
#: the node (`hybridtrt.engine.dispatch` says something else when a creator is registered but the parser would still
#: build the body: an old release, a node without ``plugin_namespace``).
BODY_FIXES: dict[str, str] = {
    "MoeExpertsNvfp4": "NVFP4 routed experts have no TensorRT plugin yet (issue 26) and their function body casts FP8 block "
    "scales and unpacks 4-bit codes, which TensorRT does not build: re-export with --dequantize-experts (routed experts in "
    "--dtype, the rest 4-bit) to build it with TensorRT; the 4-bit experts run on ONNX Runtime today",
    "MoeExpertsFp8": "FP8 MoE experts build in TensorRT only as the MoeExpertsFp8 plugin (their function body casts to/from "
    "float8, which TensorRT takes only through Q/DQ): load libhybridtrt_trt.so — build the plugins with `hybridtrt plugins "
    "build --tensorrt-root DIR` (the build then finds plugins/build/libhybridtrt_trt.so) or pass --plugins PATH — or export "
    "the MoE checkpoint without --quantize fp8 (bf16 experts)",
}

#: Custom ops whose function body has data-dependent shapes: the grouped MoE bodies size their blocks by the routing
#: (``A`` chosen experts, ``C`` = max tokens per expert: `hybridtrt.ops.moe_onnx`, TensorRT's "implicitly
#: data-dependent shapes"), which TensorRT resolves by synchronising with the host inside a step (issue 26: "a
#: device→host sync per MoE layer, no CUDA-graph capture"; GPU-unverified here), and stream capture forbids host
#: synchronisation (CUDA Programming Guide, stream capture; TensorRT-RTX 1.2 release notes: "stream
#: capture is not possible for all models, especially when using data-dependent dynamic shapes"; Torch-TensorRT's CUDA
#: graphs: "Not compatible with models that have data-dependent shapes"). An engine that builds one of them from its
#: body runs its decode steps eagerly (`hybridtrt.runtime.cuda_graphs.capture_blocker`); as our plugin (static output
#: shape, routing on the device, no host sync: plugins/README.md) it is captured like the SSD plugins.
DATA_DEPENDENT_BODIES: frozenset[str] = frozenset({"MoeExperts", "MoeExpertsFp8", "MoeExpertsNvfp4"})

#: The plugin creators libhybridtrt_trt.so registers: (name, version, namespace) (DESIGN.md §5; plugins/README.md).
HYBRIDTRT_CREATORS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("Mamba2ChunkScan", "1", "hybridtrt"),
        ("Mamba2StateUpdate", "1", "hybridtrt"),
        ("MoeExperts", "1", "hybridtrt"),
        ("MoeExpertsFp8", "1", "hybridtrt"),
    }
)
