"""What TensorRT's ONNX parser does with an exported graph, by TensorRT version — data only, one place.

Two tables, read by `hybridtrt.engine.versions` (the gates) and `hybridtrt.engine.dispatch` (the emulator):

``PARSER_RELEASES``: per release range of the ONNX parser, the newest documented default-domain opset, how a
node that has both a model-local function and a registered plugin creator is imported, and whether local
functions whose value names alias an outer scope are mishandled.

``NATIVE_OPS``: standard ONNX ops the parser builds as a dedicated TensorRT layer only from some version on
(the other helpers add rows here: Attention / TensorScatter for the static-cache flavour, ...). Ops not
listed are assumed to import on every release this project supports (the graphs use ordinary ops).

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
- Attention: operators.md (10.15) and changelog 10.14 "Added support for the Attention operator";
  TensorScatter: changelog 10.15, operators.md "past_cache and update must be 4D, axis must be -2"; the
  layers: ``INetworkDefinition::addAttention`` / ``addKVCacheUpdate`` (NvInfer.h, TensorRT 11.1), the latter
  "performs in-place updates on the cache tensor" (the runtime binds one buffer, `ICudaEngine::
  getAliasedInputTensor`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
        max_opset: Newest default-domain opset the release documents (or its bundled ONNX release defines).
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
        restrictions: What the parser refuses (operators.md), for the report.
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


#: The plugin creators libhybridtrt_trt.so registers: (name, version, namespace) (DESIGN.md §5).
HYBRIDTRT_CREATORS: frozenset[tuple[str, str, str]] = frozenset(
    {("Mamba2ChunkScan", "1", "hybridtrt"), ("Mamba2StateUpdate", "1", "hybridtrt")}
)
