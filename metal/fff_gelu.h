// Shared header (passed as `header=` to every FFF kernel): exact-erf GELU in float32.
//
// The Metal standard library has no erf, and the model's GELU is the exact one,
// gelu(z) = z * Phi(z), Phi(z) = erfc(-z / sqrt(2)) / 2. Everything is float32.
//
//   |x| < 1 : erf(x) = x + x * r(x^2), r of degree 6. Writing it as x + x*r (r(0) is
//             2/sqrt(pi) - 1) keeps the rounding of the 2/sqrt(pi) coefficient out of
//             the result: < 1 ulp in float32 against math.erf.
//   x >= 1  : erfc(x) = exp(-x^2) * u * q(u), u = 1 / (1 + x/2), q of degree 8.
//             exp(-x^2) is evaluated as exp(-xh^2) * exp(-(x - xh)(x + xh)) with xh = x
//             truncated to 1/256: xh^2 is exact in float32, so a large x^2 does not turn
//             its rounding error into a relative error of erfc. ~4 ulp relative.
//   Phi(z) for z < -sqrt(2) uses the erfc branch directly (no 1 - erf cancellation), so
//   gelu keeps its relative accuracy for negative z.
// Coefficients: float64 weighted least-squares fits (Lawson iterations towards minimax
// relative error) against mpmath on Chebyshev nodes; fit error 1.2e-9 (r) and 2.7e-9 (q),
// far below float32 rounding. The split relies on IEEE float arithmetic: the kernels are
// built with math_mode "safe" (no reassociation).
// No address-space qualifiers here: MLX passes small inputs in `constant` and others in
// `device` memory, so helpers take values only.

inline float fff_exp_neg_scaled_sq(float v, float s) {
  // exp(-s * v * v) for s in {1, 0.5}; beyond |v| = 15 the result underflows to 0 anyway,
  // and the clamp keeps vh * 256 an exact 12-bit integer.
  const float a = metal::fmin(metal::fabs(v), 15.0f);
  const float ah = metal::trunc(a * 256.0f) * 0.00390625f;
  const float head = metal::precise::exp(-s * (ah * ah));
  const float tail = metal::precise::exp(-s * ((a - ah) * (a + ah)));
  return head * tail;
}

inline float fff_erf_small(float x) {
  // |x| <= 1
  const float s = x * x;
  float r = 7.853859279e-05f;
  r = metal::fma(r, s, -8.010193123e-04f);
  r = metal::fma(r, s, 5.188327748e-03f);
  r = metal::fma(r, s, -2.685381100e-02f);
  r = metal::fma(r, s, 1.128358543e-01f);
  r = metal::fma(r, s, -3.761262596e-01f);
  r = metal::fma(r, s, 1.283791661e-01f);
  return metal::fma(r, x, x);
}

inline float fff_erfc_scaled_tail(float x) {
  // erfc(x) * exp(x^2) for x >= 1
  const float u = 1.0f / metal::fma(0.5f, x, 1.0f);
  float q = -3.687451407e-02f;
  q = metal::fma(q, u, 2.152447850e-01f);
  q = metal::fma(q, u, -3.974559903e-01f);
  q = metal::fma(q, u, 2.160502076e-01f);
  q = metal::fma(q, u, -2.137194388e-03f);
  q = metal::fma(q, u, 1.972514093e-01f);
  q = metal::fma(q, u, 2.437036633e-01f);
  q = metal::fma(q, u, 2.823565900e-01f);
  q = metal::fma(q, u, 2.820854187e-01f);
  return u * q;
}

inline float fff_erfc_pos(float x) {
  // x >= 1
  return fff_exp_neg_scaled_sq(x, 1.0f) * fff_erfc_scaled_tail(x);
}

inline float fff_erf(float x) {
  const float a = metal::fabs(x);
  if (a < 1.0f) {
    return fff_erf_small(x);
  }
  return metal::copysign(1.0f - fff_erfc_pos(a), x);
}

inline float fff_erfc(float x) {
  if (x >= 1.0f) {
    return fff_erfc_pos(x);
  }
  if (x > -1.0f) {
    return 1.0f - fff_erf_small(x);
  }
  return 2.0f - fff_erfc_pos(-x);
}

inline float fff_norm_cdf(float z) {
  // Phi(z) = erfc(-z / sqrt(2)) / 2
  const float x = -z * 0.70710678118654752f;
  if (x >= 1.0f) {
    // exp(-x^2) from z directly: z*z/2 is exact in the split, x*x would not be
    return 0.5f * fff_exp_neg_scaled_sq(z, 0.5f) * fff_erfc_scaled_tail(x);
  }
  if (x > -1.0f) {
    return 0.5f - 0.5f * fff_erf_small(x);
  }
  return 1.0f - 0.5f * fff_exp_neg_scaled_sq(z, 0.5f) * fff_erfc_scaled_tail(-x);
}

inline float fff_gelu(float z) {
  return z * fff_norm_cdf(z);
}

inline float fff_gelu_grad(float z) {
  // Phi(z) + z * phi(z), phi the standard normal density
  return fff_norm_cdf(z) + z * (0.39894228040143268f * fff_exp_neg_scaled_sq(z, 0.5f));
}
