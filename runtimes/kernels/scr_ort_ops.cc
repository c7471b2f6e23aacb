// ONNX Runtime custom-op library: registers scr::SCRNeighbourInject (float, float16, bfloat16) for the CPU
// execution provider, and with -DSCR_WITH_CUDA also for the CUDA execution provider (scr_neighbour_inject.cu).
// Built by `scr-export build-ops` (runtimes/kernels/build.py); loaded by the ORT runner when present, the node's
// ONNX function body runs otherwise. It does not link against onnxruntime: ORT hands its API to RegisterCustomOps.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "scr_neighbour_inject.h"
#include "scr_neighbour_inject_cpu.h"

#ifndef SCR_DOMAIN
#define SCR_DOMAIN "scr"
#endif

namespace {

template <typename T> struct Storage;
template <> struct Storage<float> { using type = scr::F32; static constexpr int dtype = SCR_DTYPE_F32; };
template <> struct Storage<Ort::Float16_t> { using type = scr::F16; static constexpr int dtype = SCR_DTYPE_F16; };
template <> struct Storage<Ort::BFloat16_t> { using type = scr::BF16; static constexpr int dtype = SCR_DTYPE_BF16; };

Ort::Status check_shapes(const std::vector<int64_t>& hs, const std::vector<int64_t>& ds,
                         const std::vector<int64_t>& ss, const std::vector<int64_t>& ws) {
  if (hs.size() != 3) return Ort::Status("SCRNeighbourInject: hidden must be [B, T, D]", ORT_INVALID_ARGUMENT);
  for (const auto* s : {&ds, &ss, &ws})
    if (s->size() != 2 || (*s)[0] != hs[0] || (*s)[1] != hs[1])
      return Ort::Status("SCRNeighbourInject: donor, scale and weight must be [B, T] like hidden's first two dims",
                         ORT_INVALID_ARGUMENT);
  return Ort::Status{nullptr};
}

template <typename T>
Ort::Status ComputeCpu(const Ort::Custom::Tensor<T>& h, const Ort::Custom::Tensor<int64_t>& donor,
                       const Ort::Custom::Tensor<float>& scale, const Ort::Custom::Tensor<float>& weight,
                       Ort::Custom::Tensor<T>& out) {
  const auto& hs = h.Shape();
  Ort::Status st = check_shapes(hs, donor.Shape(), scale.Shape(), weight.Shape());
  if (!st.IsOK()) return st;
  T* o = out.Allocate(hs);
  using S = typename Storage<T>::type;
  using P = typename S::storage;
  if (!scr::inject_cpu<S>(reinterpret_cast<const P*>(h.Data()), donor.Data(), scale.Data(), weight.Data(), hs[0],
                          hs[1], hs[2], reinterpret_cast<P*>(o)))
    return Ort::Status("SCRNeighbourInject: a donor index is outside [0, T)", ORT_INVALID_ARGUMENT);
  return Ort::Status{nullptr};
}

#ifdef SCR_WITH_CUDA
template <typename T>
Ort::Status ComputeCuda(OrtKernelContext* context, const Ort::Custom::Tensor<T>& h,
                        const Ort::Custom::Tensor<int64_t>& donor, const Ort::Custom::Tensor<float>& scale,
                        const Ort::Custom::Tensor<float>& weight, Ort::Custom::Tensor<T>& out) {
  const auto& hs = h.Shape();
  Ort::Status st = check_shapes(hs, donor.Shape(), scale.Shape(), weight.Shape());
  if (!st.IsOK()) return st;
  T* o = out.Allocate(hs);
  void* stream = Ort::KernelContext(context).GetGPUComputeStream();
  int rc = scr_neighbour_inject_launch(Storage<T>::dtype, h.Data(), donor.Data(), scale.Data(), weight.Data(), o,
                                       hs[0], hs[1], hs[2], stream);
  if (rc != 0)
    return Ort::Status(("SCRNeighbourInject: CUDA launch failed, cudaError " + std::to_string(rc)).c_str(), ORT_FAIL);
  return Ort::Status{nullptr};
}
#endif

}  // namespace

extern "C" __attribute__((visibility("default"))) const char* scr_ops_build_info() {
#ifdef SCR_WITH_CUDA
  return "scr_ort_ops: SCRNeighbourInject float/float16/bfloat16 on CPUExecutionProvider and CUDAExecutionProvider";
#else
  return "scr_ort_ops: SCRNeighbourInject float/float16/bfloat16 on CPUExecutionProvider";
#endif
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "scr_ort_ops: this onnxruntime is older than the headers the "
                                                       "library was built with; rebuild with scr-export build-ops");
  Ort::InitApi(api);
  static Ort::CustomOpDomain domain{SCR_DOMAIN};
  static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
  static std::once_flag once;
  try {
    std::call_once(once, [] {
      using Ort::Custom::CreateLiteCustomOp;
      ops.emplace_back(CreateLiteCustomOp("SCRNeighbourInject", "CPUExecutionProvider", ComputeCpu<float>));
      ops.emplace_back(CreateLiteCustomOp("SCRNeighbourInject", "CPUExecutionProvider", ComputeCpu<Ort::Float16_t>));
      ops.emplace_back(CreateLiteCustomOp("SCRNeighbourInject", "CPUExecutionProvider", ComputeCpu<Ort::BFloat16_t>));
#ifdef SCR_WITH_CUDA
      ops.emplace_back(CreateLiteCustomOp("SCRNeighbourInject", "CUDAExecutionProvider", ComputeCuda<float>));
      ops.emplace_back(CreateLiteCustomOp("SCRNeighbourInject", "CUDAExecutionProvider", ComputeCuda<Ort::Float16_t>));
      ops.emplace_back(CreateLiteCustomOp("SCRNeighbourInject", "CUDAExecutionProvider", ComputeCuda<Ort::BFloat16_t>));
#endif
      for (auto& op : ops) domain.Add(op.get());
    });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
