// The op schemas of the `symmpo_fast` library and the Python module symmpo_fast._C.
//
// Importing symmpo_fast._C loads this shared library, whose static initialisers register the
// schemas here, the CPU kernels (cpu_ops.cpp) and, in a CUDA build, the CUDA kernels
// (cuda_bindings.cpp); Python then calls them as torch.ops.symmpo_fast.*.  The fake (meta)
// implementations that torch.compile traces with live in symmpo_fast/_ops_csrc.py.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(symmpo_fast, m) {
  // softcap None means no softcap; labels -1 mark rows to skip (logp 0, zero gradient).
  m.def("lse_gather(Tensor logits, Tensor labels, float? softcap, float inv_temp) -> (Tensor logp, Tensor lse)");
  // Writes into out (which may be logits itself) and returns nothing: a mutated argument that
  // is also returned is an alias torch.compile's functionalisation does not accept.
  m.def(
      "softmax_grad(Tensor logits, Tensor labels, Tensor lse, Tensor grad, float? softcap, float inv_temp, "
      "Tensor(a!) out) -> ()");
  m.def("segment_sum(Tensor values, Tensor segments, int num_segments) -> Tensor");
  // ObjectiveConfig's fields as scalars; returns (terms [B, 5], d sum_b total_b / d policy [B, 5]).
  m.def(
      "loss_pass(Tensor policy, Tensor ref, float beta, float dpo_weight, float copo_weight, float pair_weight, "
      "float margin_weight, float anchor_weight, float anchor_delta, bool anchor_contrast) -> (Tensor terms, "
      "Tensor grad)");
}

namespace {

bool has_cuda() {
#ifdef SYMMPO_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "symmpo-fast native ops; call them through torch.ops.symmpo_fast";
  m.def("has_cuda", &has_cuda, "Whether this build holds the CUDA kernels");
}
