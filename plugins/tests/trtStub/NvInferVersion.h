/*
 * NOT TensorRT's header: the version macros of the TensorRT 11 stub in this directory (see NvInferRuntime.h
 * here). The CPU tests compile the plugin library against the stub when no TENSORRT_ROOT is given.
 */
#ifndef HYBRIDTRT_TRT_STUB_NV_INFER_VERSION_H
#define HYBRIDTRT_TRT_STUB_NV_INFER_VERSION_H

#define NV_TENSORRT_MAJOR 11
#define NV_TENSORRT_MINOR 1
#define NV_TENSORRT_PATCH 0
#define NV_TENSORRT_BUILD 0
//! Marks the stub, so that tests can say which headers a binary was compiled against.
#define HYBRIDTRT_TRT_STUB 1

#endif // HYBRIDTRT_TRT_STUB_NV_INFER_VERSION_H
