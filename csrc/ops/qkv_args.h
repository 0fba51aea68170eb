// The part of the torch glue that velodiff::attention and velodiff::linear_attention fill alike: the data pointers
// and the [b, h, l, d] strides of q, k, v and out into their torch-free argument structs (AttentionArgs,
// LinearAttentionArgs: both have fields q, k, v, out and q_stride .. out_stride).
#pragma once

#include <ATen/ATen.h>

namespace velodiff {

template <class Args>
inline void fill_qkv_out(Args& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out) {
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  for (int i = 0; i < 4; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
    a.v_stride[i] = v.stride(i);
    a.out_stride[i] = out.stride(i);
  }
}

}  // namespace velodiff
