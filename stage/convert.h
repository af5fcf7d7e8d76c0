/* stage/convert.h — f32 <-> bf16 / f16 conversions (weights and the lossy wire dtypes).
 * f32 -> bf16 and f32 -> f16 round to nearest even; NaN stays NaN, overflow gives inf,
 * f16 subnormals are handled both ways. Pure functions, no allocation.
 */
#ifndef STAGE_CONVERT_H
#define STAGE_CONVERT_H

#include <stddef.h>
#include <stdint.h>

float stage_bf16_to_f32(uint16_t h);
uint16_t stage_f32_to_bf16(float f);
float stage_f16_to_f32(uint16_t h);
uint16_t stage_f32_to_f16(float f);

/* Array forms: n values. */
void stage_bf16_to_f32_n(const uint16_t *src, float *dst, size_t n);
void stage_f32_to_bf16_n(const float *src, uint16_t *dst, size_t n);
void stage_f16_to_f32_n(const uint16_t *src, float *dst, size_t n);
void stage_f32_to_f16_n(const float *src, uint16_t *dst, size_t n);

#endif
