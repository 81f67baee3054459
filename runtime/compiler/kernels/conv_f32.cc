// Kiln's float convolution for XLA AOT code: replaces the runtime's EigenConv2D<float>
// (convolution_lib_f32_2d.cc). XLA's AOT emitter does not take 3D convolutions at all.
//
// Why: the stock kernel contracts a virtual image-patch tensor, and on AVX-512 it cannot be built
// with Eigen's AVX-512 GEMM kernels (ambiguous specializations), so it ran at about 0.65x of
// TensorFlow's graph executor and hardly used a second core. Here patches are copied into a small
// contiguous buffer (im2col) and multiplied with Eigen's plain matrix product; rows are split
// across the caller and the Eigen pool. 1x1 convolutions skip the copy; depthwise convolutions
// are summed directly.
//
// Layouts, as XLA passes them: input [batch, x, y, channels], kernel [x, y, channels per group,
// filters], output [batch, x, y, filters], all row-major; x is the first spatial dimension. lhs dilation dilates the input (transposed convolutions), rhs
// dilation the kernel (atrous convolutions).
#define EIGEN_USE_THREADS
#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "Eigen/Core"
#include "absl/functional/any_invocable.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace {

using Index = Eigen::Index;
using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Strided = Eigen::OuterStride<>;

template <int R>
struct Conv {
  Index batch, channels, filters, groups, kernel_channels;
  std::array<Index, R> in, kernel, out, stride, pad, lhs_dilation, rhs_dilation;

  Index OutPixels() const { Index n = 1; for (Index d : out) n *= d; return n; }
  Index KernelPixels() const { Index n = 1; for (Index d : kernel) n *= d; return n; }
  Index InPixels() const { Index n = 1; for (Index d : in) n *= d; return n; }

  bool IsPointwise() const {
    for (int d = 0; d < R; ++d) {
      if (kernel[d] != 1 || stride[d] != 1 || pad[d] != 0 || lhs_dilation[d] != 1 || in[d] != out[d])
        return false;
    }
    return groups == 1;
  }
  bool IsDepthwise() const { return groups > 1 && kernel_channels == 1 && groups == channels; }

  // Where output pixel `pixel` starts reading, per spatial dimension (before kernel offsets).
  std::array<Index, R> Origin(Index pixel) const {
    std::array<Index, R> origin;
    for (int d = R - 1; d >= 0; --d) {
      origin[d] = (pixel % out[d]) * stride[d] - pad[d];
      pixel /= out[d];
    }
    return origin;
  }

  // Input pixel (within one image) that kernel pixel k (by coordinates) reads from `origin`, or -1
  // in padding or between the rows of a dilated input.
  Index Source(const std::array<Index, R>& origin, const std::array<Index, R>& k) const {
    Index pixel = 0;
    for (int d = 0; d < R; ++d) {
      const Index pos = Along(d, origin[d] + k[d] * rhs_dilation[d]);
      if (pos < 0) return -1;
      pixel = pixel * in[d] + pos;
    }
    return pixel;
  }

  // The input index along dimension d at position `pos` of the padded, dilated input, or -1.
  Index Along(int d, Index pos) const {
    if (pos < 0) return -1;
    if (lhs_dilation[d] != 1) {  // divisions cost tens of cycles: only where the input is dilated
      if (pos % lhs_dilation[d] != 0) return -1;
      pos /= lhs_dilation[d];
    }
    return pos < in[d] ? pos : -1;
  }

  // Steps kernel coordinates k through dimensions [0, dims) like an odometer.
  void Advance(std::array<Index, R>& k, int dims) const {
    for (int d = dims - 1; d >= 0 && ++k[d] == kernel[d]; --d) k[d] = 0;
  }

  // Output rows [begin, end) (row = batch * OutPixels() + pixel).
  void Rows(const float* input, const float* weights, float* output, Index begin, Index end) const {
    if (IsDepthwise()) return Depthwise(input, weights, output, begin, end);
    const Index cg = kernel_channels, fg = filters / groups, depth = KernelPixels() * cg;
    if (IsPointwise()) {
      Eigen::Map<const RowMajor> a(input + begin * channels, end - begin, channels);
      Eigen::Map<const RowMajor> b(weights, channels, filters);
      Eigen::Map<RowMajor>(output + begin * filters, end - begin, filters).noalias() = a * b;
      return;
    }
    // Chunks whose patch buffer stays within the core's cache.
    const Index chunk = std::max<Index>(16, std::min<Index>(end - begin, (256 * 1024) / depth));
    std::vector<float> patches(chunk * depth);
    for (Index first = begin; first < end; first += chunk) {
      const Index rows = std::min(chunk, end - first);
      for (Index g = 0; g < groups; ++g) {
        for (Index r = 0; r < rows; ++r) Patch(input, first + r, g, patches.data() + r * depth);
        Eigen::Map<const RowMajor> a(patches.data(), rows, depth);
        Eigen::Map<const RowMajor, 0, Strided> b(weights + g * fg, depth, fg, Strided(filters));
        Eigen::Map<RowMajor, 0, Strided>(output + first * filters + g * fg, rows, fg, Strided(filters))
            .noalias() = a * b;
      }
    }
  }

  // Copies the patch output row `row` reads, for group g, as [kernel pixel][channel of the group].
  void Patch(const float* input, Index row, Index g, float* dst) const {
    const Index cg = kernel_channels, image = row / OutPixels();
    const std::array<Index, R> origin = Origin(row % OutPixels());
    const float* base = input + image * InPixels() * channels + g * cg;
    // Fast path: the innermost kernel row lies inside the input, so it is one contiguous run of
    // kernel[R-1] pixels (all channels of the group when there is one group).
    const int last = R - 1;
    const bool contiguous_rows = lhs_dilation[last] == 1 && rhs_dilation[last] == 1 && groups == 1;
    std::array<Index, R> k{};
    for (Index done = 0; done < KernelPixels();) {
      Index offset = 0;
      bool inside = true;
      for (int d = 0; d < last; ++d) {
        const Index pos = Along(d, origin[d] + k[d] * rhs_dilation[d]);
        inside = inside && pos >= 0;
        offset = offset * in[d] + pos;
      }
      const Index run = kernel[last];
      if (!inside) {
        std::fill(dst, dst + run * cg, 0.0f);
      } else if (contiguous_rows && origin[last] >= 0 && origin[last] + run <= in[last]) {
        const float* from = base + (offset * in[last] + origin[last]) * channels;
        std::copy(from, from + run * cg, dst);
      } else {
        for (Index j = 0; j < run; ++j) {
          const Index pos = Along(last, origin[last] + j * rhs_dilation[last]);
          float* to = dst + j * cg;
          if (pos < 0) {
            std::fill(to, to + cg, 0.0f);
          } else {
            const float* from = base + (offset * in[last] + pos) * channels;
            for (Index c = 0; c < cg; ++c) to[c] = from[c];
          }
        }
      }
      dst += run * cg;
      done += run;
      Advance(k, last);
    }
  }

  void Depthwise(const float* input, const float* weights, float* output, Index begin, Index end) const {
    const Index multiplier = filters / groups;
    for (Index row = begin; row < end; ++row) {
      const Index image = row / OutPixels();
      const std::array<Index, R> origin = Origin(row % OutPixels());
      float* dst = output + row * filters;
      std::fill(dst, dst + filters, 0.0f);
      std::array<Index, R> k{};
      for (Index kernel_pixel = 0; kernel_pixel < KernelPixels(); ++kernel_pixel, Advance(k, R)) {
        const Index src = Source(origin, k);
        if (src < 0) continue;
        const float* from = input + (image * InPixels() + src) * channels;
        const float* w = weights + kernel_pixel * filters;
        if (multiplier == 1) {
          for (Index c = 0; c < channels; ++c) dst[c] += from[c] * w[c];
        } else {
          for (Index c = 0; c < channels; ++c)
            for (Index m = 0; m < multiplier; ++m) dst[c * multiplier + m] += from[c] * w[c * multiplier + m];
        }
      }
    }
  }

  // Splits the rows between the calling thread and the pool's workers, then returns.
  void Run(const Eigen::ThreadPoolDevice* device, const float* input, const float* weights,
           float* output) const {
    const Index rows = batch * OutPixels();
    const Index work = rows * KernelPixels() * kernel_channels * filters;
    Index tasks = device ? std::min<Index>(device->numThreads(), rows) : 1;
    if (work < 64 * 1024) tasks = 1;  // too small to be worth a hand-off
    const Index per_task = (rows + tasks - 1) / tasks;
    Eigen::Barrier barrier(static_cast<unsigned>(tasks - 1));
    for (Index t = 1; t < tasks; ++t) {
      device->enqueueNoNotification([&, t] {
        Rows(input, weights, output, t * per_task, std::min(rows, (t + 1) * per_task));
        barrier.Notify();
      });
    }
    Rows(input, weights, output, 0, std::min(rows, per_task));
    barrier.Wait();
  }
};

}  // namespace

namespace xla::cpu::internal {

using DoneCallback = absl::AnyInvocable<void()>;

template <typename ScalarType>
void EigenConv2D(const Eigen::ThreadPoolDevice* device, ScalarType* out, const ScalarType* lhs,
                 const ScalarType* rhs, Index input_batch, Index input_x, Index input_y,
                 Index input_channels, Index kernel_x, Index kernel_y, Index kernel_channels,
                 Index kernel_filters, Index output_x, Index output_y, Index x_stride, Index y_stride,
                 Index padding_x_before, Index padding_x_after, Index padding_y_before,
                 Index padding_y_after, Index lhs_x_dilation, Index lhs_y_dilation,
                 Index rhs_x_dilation, Index rhs_y_dilation, Index feature_group_count,
                 DoneCallback done);

template <>
void EigenConv2D<float>(const Eigen::ThreadPoolDevice* device, float* out, const float* lhs,
                        const float* rhs, Index input_batch, Index input_x, Index input_y,
                        Index input_channels, Index kernel_x, Index kernel_y, Index kernel_channels,
                        Index kernel_filters, Index output_x, Index output_y, Index x_stride,
                        Index y_stride, Index padding_x_before, Index, Index padding_y_before, Index,
                        Index lhs_x_dilation, Index lhs_y_dilation, Index rhs_x_dilation,
                        Index rhs_y_dilation, Index feature_group_count, DoneCallback done) {
  const Conv<2> conv{input_batch, input_channels, kernel_filters, feature_group_count, kernel_channels,
                     {input_x, input_y}, {kernel_x, kernel_y}, {output_x, output_y},
                     {x_stride, y_stride}, {padding_x_before, padding_y_before},
                     {lhs_x_dilation, lhs_y_dilation}, {rhs_x_dilation, rhs_y_dilation}};
  conv.Run(device, lhs, rhs, out);
  done();
}

}  // namespace xla::cpu::internal
