// MLX affine dequantize: out = q * scale + bias, with mx.dequantize's
// rounding: the product rounded to T (the scales' dtype), then the sum
// rounded to T, then the cast to O. For half and bfloat16 the float32
// product of a code (<= 8 bits) and a scale is exact and float32 has more
// than twice their precision, so rounding float32 results to T equals
// rounding exact ones; for float32 mqo_mul/mqo_add keep the two roundings
// from being fused into one fma.
// Template: T, O, bits, group_size. Inputs: w [rows * K * bits / 32],
// scales, biases [rows * K / group_size], params [units, units per row].
// Output: out [rows * K]. One thread per unit of 32 values.
uint unit = thread_position_in_grid.x;
int n_units = params[0];
int units_per_row = params[1];
if (static_cast<int>(unit) < n_units) {
  uint words[bits];
  AffineUnit<bits>::load(w + unit * bits, words);
  uint row = unit / units_per_row;
  uint in_row = unit % units_per_row;
  uint group = row * (units_per_row * AFFINE_UNIT / group_size) +
      in_row * AFFINE_UNIT / group_size;
  float scale = static_cast<float>(scales[group]);
  float bias = static_cast<float>(biases[group]);
  device O* o = out + static_cast<ulong>(unit) * AFFINE_UNIT;
  for (int v = 0; v < AFFINE_UNIT; ++v) {
    float q = affine_code_float(affine_code<bits>(words, v));
    float scaled = static_cast<float>(static_cast<T>(mqo_mul(q, scale)));
    T value = static_cast<T>(mqo_add(scaled, bias));
    o[v] = static_cast<O>(value);
  }
}
