// sorted_gather.cu: what the gather kernel families (msda.cu, dcnv3.cu) share for their
// scattered gradient (the value or input gradient) and its accumulator.
//
//   sorted_gather<T, TAcc, Index>      target[key*D + d] += the key's entries, summed in sorted order
//   accum_to_storage<TAcc, T, Index>   the float32 (float64) accumulator -> the dtype
//
// A gather kernel's backward adds each bilinear corner's share of a row of
// grad_output to the element of the sampled array the corner lands on. With
// atomics that order changes from run to run. The deterministic path turns
// the scatter into a gather, as dcn_col2im_sorted.cu does for deformable
// convolution:
//   1. a family's keys kernel (msda_value_keys, dcnv3_input_keys) writes, for
//      every corner -- entry e, `entries_per_row` consecutive entries for each
//      row of grad_output -- the key of the element it lands on (an Index; a
//      sentinel, the number of keys, where it counts 0) and its weight;
//   2. the host side sorts the entries by key, stably (the entries of one key
//      stay in the order of e), and finds where each key's run starts
//      (searchsorted: cudcn/backends/cuda/gathers.py);
//   3. sorted_gather: one thread per (key, channel) sums its run in that order.
// A stable sort's result does not depend on how it is computed, so every sum
// has one fixed order, whatever the grid.
#include "dcn_common.cuh"

/// target[key * D + d] += sum over the key's entries, in sorted order, of
/// weight x rows[row of the entry, d], for every key below the sentinel.
///
/// rows:            (first_row + entries / entries_per_row, D), the gradient rows (grad_output)
/// order:           entries sorted stably by key
/// starts:          (keys + 1,) where each key's run begins in order
/// entries_per_row: the corners of one row (entry e belongs to row first_row + e / entries_per_row)
/// total:           keys * D, one thread per (key, channel)
/// target:          (keys, D) in TAcc
template <typename T, typename TAcc, typename Index>
__global__ void sorted_gather(const T* __restrict__ rows, const long long* __restrict__ order,
                              const long long* __restrict__ starts,
                              const typename ComputeType<T>::type* __restrict__ key_weights, Index first_row,
                              int channels, long long entries_per_row, Index total, TAcc* __restrict__ target) {
  typedef typename ComputeType<T>::type Acc;
  // Channel fastest: a warp shares a key (its run of entries) and reads
  // consecutive channels of each row.
  DCN_GRID_STRIDE_LOOP(index, total) {
    const Index key = index / channels;
    const int d = static_cast<int>(index % channels);
    const long long begin = dcn_load(starts, key), end = dcn_load(starts, key + 1);
    if (begin == end) continue;
    Acc sum = Acc(0);
    for (long long at = begin; at < end; ++at) {
      const long long e = dcn_load(order, at);
      const Index row = first_row + static_cast<Index>(e / entries_per_row);
      sum += dcn_load(key_weights, e) * to_compute(dcn_load(rows, row * channels + d));
    }
    dcn_store(target, index, static_cast<TAcc>(dcn_load(target, index) + sum));
  }
}

/// dst[i] = src[i] rounded to T, i < total.
template <typename TAcc, typename T, typename Index>
__global__ void accum_to_storage(const TAcc* __restrict__ src, Index total, T* __restrict__ dst) {
  DCN_GRID_STRIDE_LOOP(index, total) store(dst + index, dcn_load(src, index));
}
