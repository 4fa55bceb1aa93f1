// support/quant_ops.cpp: the products of support/quant_kernels.c as torch ops (nanollama::fp32_matmul, int8_matmul,
// int4_matmul, nf4_matmul), built with it into one library by support/quant.py. Called through torch's dispatcher
// from C++, an op costs ~1 us where a Python-defined op cost ~9 us: a 135M model's decode step makes 121 of them,
// and a torch.compile'd step calls them from its graph. Each takes fp32 x (M, K) and returns y (M, N) fp32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

extern "C" {
void fp32_matmul(const float* x, const float* w, float* y, long M, long N, long K);
void int8_matmul(const float* x, const int8_t* w, const float* s, float* y, long M, long N, long K);
void int4_matmul(const float* x, const uint8_t* w, const float* s, const float* z, float* y, long M, long N, long K,
                 long gs);
void nf4_matmul(const float* x, const uint8_t* w, const int8_t* aq, const float* as, const float* off,
                const float* code, float* y, long M, long N, long K);
}

namespace {

// x as the kernels read it: 2-D fp32, contiguous, on the CPU; t as dtype, contiguous
at::Tensor rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "nanollama kernels: x must be a 2-D fp32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  return x.contiguous();
}

at::Tensor as(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.device().is_cpu(), "nanollama kernels: ", name, " must be a ", dtype,
              " CPU tensor, got ", t.scalar_type());
  return t.contiguous();
}

at::Tensor fp32_mm(const at::Tensor& x_, const at::Tensor& w_) {
  auto x = rows_of(x_), w = as(w_, at::kFloat, "weight");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "fp32_matmul: weight ", w.sizes(), " for x ", x.sizes());
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  fp32_matmul(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), y.size(0), y.size(1), x.size(1));
  return y;
}

at::Tensor int8_mm(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& s_) {
  auto x = rows_of(x_), w = as(w_, at::kChar, "weight"), s = as(s_, at::kFloat, "scales");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && s.numel() == w.size(0), "int8_matmul: weight ", w.sizes(),
              ", scales ", s.sizes(), " for x ", x.sizes());
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  int8_matmul(x.data_ptr<float>(), w.data_ptr<int8_t>(), s.data_ptr<float>(), y.data_ptr<float>(), y.size(0),
              y.size(1), x.size(1));
  return y;
}

at::Tensor int4_mm(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& s_, const at::Tensor& z_) {
  auto x = rows_of(x_), w = as(w_, at::kByte, "weight"), s = as(s_, at::kFloat, "scales"),
       z = as(z_, at::kFloat, "zeros");
  long K = x.size(1), groups = s.dim() == 2 ? s.size(1) : 0;
  TORCH_CHECK(w.dim() == 2 && 2 * w.size(1) == K && groups > 0 && K % groups == 0 && s.size(0) == w.size(0) &&
                  z.sizes() == s.sizes(),
              "int4_matmul: weight ", w.sizes(), ", scales ", s.sizes(), ", zeros ", z.sizes(), " for x ", x.sizes());
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  int4_matmul(x.data_ptr<float>(), w.data_ptr<uint8_t>(), s.data_ptr<float>(), z.data_ptr<float>(),
              y.data_ptr<float>(), y.size(0), y.size(1), K, K / groups);
  return y;
}

at::Tensor nf4_mm(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& aq_, const at::Tensor& as_,
                  const at::Tensor& off_, const at::Tensor& code_) {
  auto x = rows_of(x_), packed = as(packed_, at::kByte, "packed"), aq = as(aq_, at::kChar, "absmax_q"),
       scale = as(as_, at::kFloat, "absmax_scale"), off = as(off_, at::kFloat, "absmax_offset"),
       code = as(code_, at::kFloat, "code");
  long K = x.size(1);
  TORCH_CHECK(K % 32 == 0 && packed.numel() * 2 % K == 0 && code.numel() == 16 && off.numel() == 1,
              "nf4_matmul: packed ", packed.sizes(), " for x ", x.sizes());
  auto y = at::empty({x.size(0), packed.numel() * 2 / K}, x.options());
  nf4_matmul(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), aq.data_ptr<int8_t>(), scale.data_ptr<float>(),
             off.data_ptr<float>(), code.data_ptr<float>(), y.data_ptr<float>(), y.size(0), y.size(1), K);
  return y;
}

}  // namespace

TORCH_LIBRARY(nanollama, m) {
  m.def("fp32_matmul(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_matmul(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int4_matmul(Tensor x, Tensor weight, Tensor scales, Tensor zeros) -> Tensor");
  m.def("nf4_matmul(Tensor x, Tensor packed, Tensor absmax_q, Tensor absmax_scale, Tensor absmax_offset, "
        "Tensor code) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanollama, CPU, m) {
  m.impl("fp32_matmul", &fp32_mm);
  m.impl("int8_matmul", &int8_mm);
  m.impl("int4_matmul", &int4_mm);
  m.impl("nf4_matmul", &nf4_mm);
}
