// Entry points of the torch-free kernels. The torch glue in csrc/ops/ calls these.
#pragma once

#include "velodiff/attention.h"
#include "velodiff/cache_gate.h"
#include "velodiff/fp8.h"
#include "velodiff/linear_attention.h"
#include "velodiff/qgemm.h"
#include "velodiff/sampler_update.h"
#include "velodiff/window_attention.h"

namespace velodiff {

// CPU kernel (csrc/kernels/cpu/sampler_update.cpp), OpenMP over elements. Returns false and writes a message
// to `error` (at least 256 bytes) on invalid arguments.
bool sampler_update_cpu(const SamplerUpdateArgs& args, char* error);

// Quantized GEMM family (csrc/kernels/cpu/qgemm.cpp; format in velodiff/qgemm.h). Return false and write a
// message to `error` (at least 256 bytes) on invalid arguments.
bool quantize_act_cpu(const QuantizeActArgs& args, char* error);
bool qgemm_cpu(const QGemmArgs& args, char* error);
// Weight prepacking for qgemm_cpu (QGemmArgs::packed): the bytes the pack of these weights takes on the current code
// path (0 on the portable path, which reads the weights as they are), and the pack itself (uses bits, N, K, R,
// dtype, qw, wscales, bias, lora_up). Return false and write a message on invalid arguments.
bool qgemm_packed_bytes_cpu(const QGemmArgs& args, int64_t& bytes, char* error);
bool qgemm_pack_weights_cpu(const QGemmArgs& args, void* out, int64_t bytes, char* error);

// FP8 W8A8 GEMM family (csrc/kernels/cpu/fp8.cpp; format in velodiff/fp8.h), OpenMP over rows (quantize_fp8) and
// 16-column panels of the output (fp8_gemm). Return false and write a message to `error` (at least 256 bytes) on
// invalid arguments.
bool quantize_fp8_cpu(const QuantizeFp8Args& args, char* error);
bool fp8_gemm_cpu(const Fp8GemmArgs& args, char* error);
// velodiff::fp8_attention (csrc/kernels/cpu/fp8_attention.cpp; semantics in velodiff/fp8.h), OpenMP over
// (b, h, query block).
bool fp8_attention_cpu(const AttentionArgs& args, char* error);

// Cache gate (csrc/kernels/cpu/cache_gate.cpp; format in velodiff/cache_gate.h), OpenMP over fixed chunks of
// each sample. Reads and writes args.state and writes *args.decision. Returns false and writes a message to
// `error` (at least 256 bytes) on invalid arguments.
bool cache_gate_cpu(const CacheGateArgs& args, char* error);

// Exact attention (csrc/kernels/cpu/attention.cpp; format in velodiff/attention.h), OpenMP over batch x heads x
// query blocks; the same bits for any thread count. Returns false and writes a message to `error` (at least 256
// bytes) on invalid arguments.
bool attention_cpu(const AttentionArgs& args, char* error);

// Non-causal linear attention (csrc/kernels/cpu/linear_attention.cpp; format in velodiff/linear_attention.h): a state
// pass over (batch x heads x key chunks), then an output pass over (batch x heads x query blocks), OpenMP; the same
// bits for any thread count. Returns false and writes a message to `error` (at least 256 bytes) on invalid
// arguments.
bool linear_attention_cpu(const LinearAttentionArgs& args, char* error);
// Windowed attention, MSW-MSA (csrc/kernels/cpu/window_attention.cpp; format in velodiff/window_attention.h),
// OpenMP over batch x heads x windows x query blocks, exact attention's tile routine; the same bits for any thread
// count. Returns false and writes a message to `error` (at least 256 bytes) on invalid arguments.
bool window_attention_cpu(const WindowAttentionArgs& args, char* error);

// The code path each CPU kernel family runs on this CPU under the current environment (VELODIFF_CPU_ISA and the
// kernels' *_SCALAR switches): "avx512bf16", "avx512", "avx2" or "portable" (attention: exact and windowed),
// "avx512vnni", "avx2" or "portable" (qgemm; quantize_act runs AVX2 code on the VNNI path), "avx2" or "portable"
// (linear attention). For `velodiff info`.
const char* attention_cpu_path();
const char* qgemm_cpu_path();
const char* linear_attention_cpu_path();
const char* fp8_gemm_cpu_path();  // "avx512bf16" or "portable"

#ifdef VELODIFF_WITH_CUDA
// CUDA kernel (csrc/kernels/cuda/sampler_update.cu). `stream` is a cudaStream_t; `workspace` must hold
// 4 * batch doubles when guidance_rescale > 0. Returns the cudaError_t of the launches as int (0 = success).
int sampler_update_cuda(const SamplerUpdateArgs& args, double* workspace, void* stream);

// Quantized GEMM family (csrc/kernels/cuda/quantize_act.cu, qgemm.cu and the kernel files qgemm.cu dispatches to,
// listed in qgemm_device.cuh). `args.lora_act` must be zero-filled by the caller
// (partial down-projections are added atomically). Return the cudaError_t as int (0 = success).
int quantize_act_cuda(const QuantizeActArgs& args, void* stream);
int qgemm_cuda(const QGemmArgs& args, void* stream);
// Whether the loaded build has sm_90a device code for the current device (the wgmma paths need it). Returns the
// cudaError_t as int; `built` is set on success.
int qgemm_cuda_wgmma_built(bool& built);

// FP8 W8A8 GEMM family (csrc/kernels/cuda/fp8.cu): quantize_fp8, one block per row; fp8_gemm, 64 x 64 output
// tiles with the codes decoded into shared memory and fp32 FMAs (simple and correct; tensor cores come with a
// GPU to measure them on). Return the cudaError_t as int (0 = success).
int quantize_fp8_cuda(const QuantizeFp8Args& args, void* stream);
int fp8_gemm_cuda(const Fp8GemmArgs& args, void* stream);
// velodiff::fp8_attention (csrc/kernels/cuda/fp8_attention.cu): Q and K rows and V columns quantized into `workspace`
// (fp8_attention_cuda_workspace_floats(...) floats, velodiff/fp8.h; no initialisation needed), then one block per
// (query, b * H + h) in two passes over the keys. Returns the cudaError_t of the launches as int (0 = success).
int fp8_attention_cuda(const AttentionArgs& args, float* workspace, void* stream);

// Cache gate (csrc/kernels/cuda/cache_gate.cu): a partial-sum kernel (which also copies the probe into the spare
// buffer) and a one-block finalize kernel; state, the valid index included, is read on the device. `workspace`
// must hold cache_gate_cuda_workspace_doubles(batch, per_sample) doubles (velodiff/cache_gate.h); it needs no
// initialisation. Returns the cudaError_t of the launches as int (0 = success).
int cache_gate_cuda(const CacheGateArgs& args, double* workspace, void* stream);

// Exact attention (csrc/kernels/cuda/attention.cu): one launch, one warp per query, K / V tiles in shared memory.
// Returns the cudaError_t of the launch as int (0 = success).
int attention_cuda(const AttentionArgs& args, void* stream);

// Non-causal linear attention (csrc/kernels/cuda/linear_attention.cu): a state kernel (blocks of (b, h), key chunk,
// 32 x 32 state tile), a chunk-order sum when there are several chunks, and an output kernel (one warp per query).
// `workspace` must hold linear_attention_cuda_workspace_floats(B * H, Nk, D, Dv) floats (velodiff/linear_attention.h);
// it needs no initialisation. Returns the cudaError_t of the launches as int (0 = success).
int linear_attention_cuda(const LinearAttentionArgs& args, float* workspace, void* stream);
// Windowed attention (csrc/kernels/cuda/window_attention.cu): one launch, a block per (b, h, window, 8 queries),
// one warp per query, the window's keys in shared-memory tiles. Returns the cudaError_t of the launch as int.
int window_attention_cuda(const WindowAttentionArgs& args, void* stream);
#endif

}  // namespace velodiff
