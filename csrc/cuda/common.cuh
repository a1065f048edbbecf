// Helpers shared by the CUDA kernels (projection.cu, psg.cu): CUDA error checks, the per-device
// info cache, stream-ordered scratch memory, the choice of the split count, the fixed-order
// reduction of split partial sums, and the bf16 hi + lo split of generated Gaussian entries.
//
// Everything is in an unnamed namespace, so each .cu file keeps its own internal copy (as
// when the helpers were written out in each file); the functions are inline so a file that
// does not use one gets no unused-function warning.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <mutex>
#include <stdexcept>
#include <string>

namespace fastattr {
namespace cuda {
namespace {

constexpr int kMaxGridY = 65535;
constexpr int kMaxGridZ = 65535;
constexpr int kMaxDevices = 64;

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string("fastattr._cuda: ") + what + " failed: " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda(err, what);
}

// A kernel launch reports configuration errors through cudaGetLastError only.
inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

inline int current_device() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// `Info` of `device`, computed once per device and cached: its `sms` (SM count) and `major`
// (compute capability) fields are queried here, the rest is filled in by `configure` (kernel
// attributes, occupancy), which runs only on devices of compute capability >= 8.0.
template <typename Info>
const Info& cached_device_info(int device, void (*configure)(Info&)) {
  static std::mutex mutex;
  static Info cache[kMaxDevices];
  static bool have[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices)
    throw std::runtime_error("fastattr._cuda: device id out of range");
  std::lock_guard<std::mutex> lock(mutex);
  if (!have[device]) {
    Info info;
    check(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute(MultiProcessorCount)");
    check(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device),
          "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
    if (info.major >= 8) configure(info);
    cache[device] = info;
    have[device] = true;
  }
  return cache[device];
}

// Stream-ordered scratch memory, freed (stream-ordered, after the kernels that use it) when the
// owner goes out of scope, also when a launch throws. `label` names it in error messages.
class StreamBuffer {
 public:
  StreamBuffer(cudaStream_t stream, const char* label) : stream_(stream), label_(label) {}
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  ~StreamBuffer() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  // false when the device has no stream-ordered allocator or the memory is not there: the
  // workspace only buys parallelism, so the caller then does without it
  bool allocate(size_t bytes) {
    void* p = nullptr;
    const cudaError_t err = cudaMallocAsync(&p, bytes, stream_);
    if (err == cudaErrorNotSupported || err == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // handled: leave no error behind for the launch checks
      return false;
    }
    if (err != cudaSuccess) throw_cuda(err, what("cudaMallocAsync").c_str());
    ptr_ = p;
    return true;
  }
  float* get() const { return static_cast<float*>(ptr_); }
  void release() {
    if (ptr_ == nullptr) return;
    void* p = ptr_;
    ptr_ = nullptr;
    const cudaError_t err = cudaFreeAsync(p, stream_);
    if (err != cudaSuccess) throw_cuda(err, what("cudaFreeAsync").c_str());
  }

 private:
  std::string what(const char* call) const { return std::string(call) + "(" + label_ + ")"; }

  cudaStream_t stream_;
  const char* label_;
  void* ptr_ = nullptr;
};

// How many slices to cut a reduction of n_chunks chunks into: enough for `tiles` output tiles
// to fill the `resident` blocks the device holds at once, each slice at least
// min_chunks_per_split chunks, at most kMaxGridZ slices; 1 when the tiles alone fill it.
inline int64_t split_count(int64_t tiles, int64_t resident, int64_t n_chunks,
                           int64_t min_chunks_per_split) {
  if (tiles >= resident) return 1;
  int64_t splits = (resident + tiles - 1) / tiles;
  const int64_t max_splits = n_chunks / min_chunks_per_split;
  if (splits > max_splits) splits = max_splits;
  if (splits > kMaxGridZ) splits = kMaxGridZ;
  if (splits < 1) splits = 1;
  return splits;
}

// Four fp32 values (Gaussian entries, finite) as bf16 hi = bf16(z) and lo = bf16(z - hi), stored
// to hi[0..3] and lo[0..3] (4-byte aligned shared memory) as bf16 pairs.
__device__ __forceinline__ void store_split4_bf16(__nv_bfloat16* hi, __nv_bfloat16* lo, float z0,
                                                  float z1, float z2, float z3) {
  const __nv_bfloat162 h01 = __floats2bfloat162_rn(z0, z1);
  const __nv_bfloat162 h23 = __floats2bfloat162_rn(z2, z3);
  const __nv_bfloat162 l01 = __floats2bfloat162_rn(z0 - __low2float(h01), z1 - __high2float(h01));
  const __nv_bfloat162 l23 = __floats2bfloat162_rn(z2 - __low2float(h23), z3 - __high2float(h23));
  __nv_bfloat162* hi2 = reinterpret_cast<__nv_bfloat162*>(hi);
  __nv_bfloat162* lo2 = reinterpret_cast<__nv_bfloat162*>(lo);
  hi2[0] = h01;
  hi2[1] = h23;
  lo2[0] = l01;
  lo2[1] = l23;
}

// out[e] (+)= scale * sum_{s < splits} partial[s][e], summed in order s = 0, 1, ...: the
// result does not depend on which block finished first.
__global__ void reduce_splits_kernel(float* __restrict__ out, const float* __restrict__ partial,
                                     int splits, int64_t n, float scale, int accumulate) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += stride) {
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += partial[z * n + e];
    const float v = scale * s;
    out[e] = accumulate ? out[e] + v : v;
  }
}

// Enqueues reduce_splits_kernel over n outputs (256-thread blocks, at most 8 per SM);
// `what` names the launch in the error message.
inline void reduce_splits(float* out, const float* partial, int splits, int64_t n, float scale,
                          bool accumulate, int sms, cudaStream_t stream, const char* what) {
  const int64_t blocks = (n + 255) / 256;
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  const int grid = static_cast<int>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
  reduce_splits_kernel<<<grid, 256, 0, stream>>>(out, partial, splits, n, scale,
                                                 accumulate ? 1 : 0);
  check_launch(what);
}

}  // namespace
}  // namespace cuda
}  // namespace fastattr
