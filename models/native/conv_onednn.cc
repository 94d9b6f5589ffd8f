// Convolution (NHWC, float32, grouped or not) on the CPU through oneDNN, as three XLA FFI
// handlers: the forward pass, the input gradient and the kernel gradient. models/onednn.py
// registers them with jax.ffi and ties them together with a custom_vjp.
//
// Layouts: the input and output are NHWC; the kernel is nn.Conv's (kh, kw, IC / groups, OC)
// array, which is oneDNN's grouped `hwigo` weights (OC split as groups x OC / groups; a depthwise
// convolution has one input and one output channel per group). oneDNN chooses its own (blocked)
// weights layout; a reorder converts to and from ours.
//
// Every handler takes the strides, the explicit paddings (top, bottom, left, right) and the
// group count as attributes. Threads: a call splits its batch among the threads of XLA's intra-op thread pool
// (the FFI's ThreadPool, the calling thread included) and runs oneDNN on each chunk with one
// thread, so that it uses the cores XLA was given and no OpenMP threads of its own. Primitives
// are created once per shape and use a user scratchpad allocated per call, so that several
// threads (and XLA devices) may run the same primitive at once.

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Dims = memory::dims;

enum class Pass : int64_t { kForward, kInputGradient, kKernelGradient };

// Sizes of one depthwise convolution.
struct Geometry {
  int64_t n, h, w, ic, oc, groups, kh, kw, oh, ow, stride_h, stride_w, pad_top, pad_bottom,
      pad_left, pad_right;
};

// A created primitive with the layouts it works in and the reorder that converts the kernel
// between our layout and the primitive's.
struct Entry {
  dnnl::primitive primitive;
  memory::desc primitive_weights;  // the layout the primitive reads or writes the kernel in
  memory::desc user_weights;       // (kh, kw, 1, C): hwigo
  memory::desc scratchpad;
  bool reorder_weights;
  dnnl::reorder weights_reorder;  // user -> primitive (passes 1, 2) or primitive -> user (pass 3)
  std::string implementation;
};

const dnnl::engine& Engine() {
  static const dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// Sets `entry`'s primitive from its descriptor `pd`, with `weights`, the layout it reads or
// writes the kernel in.
template <typename Primitive>
void SetPrimitive(const typename Primitive::primitive_desc& pd, const memory::desc& weights,
                  Entry* entry) {
  entry->primitive = Primitive(pd);
  entry->primitive_weights = weights;
  entry->scratchpad = pd.scratchpad_desc();
  entry->implementation = pd.impl_info_str();
}

Entry MakeEntry(Pass pass, const Geometry& g) {
  const Dims activation_dims = {g.n, g.ic, g.h, g.w};
  const Dims output_dims = {g.n, g.oc, g.oh, g.ow};
  const Dims weights_dims = {g.groups, g.oc / g.groups, g.ic / g.groups, g.kh, g.kw};
  const Dims strides = {g.stride_h, g.stride_w};
  const Dims padding_l = {g.pad_top, g.pad_left};
  const Dims padding_r = {g.pad_bottom, g.pad_right};
  const memory::desc src(activation_dims, memory::data_type::f32, memory::format_tag::nhwc);
  const memory::desc dst(output_dims, memory::data_type::f32, memory::format_tag::nhwc);
  const memory::desc any_weights(weights_dims, memory::data_type::f32, memory::format_tag::any);
  const memory::desc user_weights(weights_dims, memory::data_type::f32,
                                  memory::format_tag::hwigo);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto& engine = Engine();
  auto forward = dnnl::convolution_forward::primitive_desc(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
      any_weights, dst, strides, padding_l, padding_r, attr);
  Entry entry;
  entry.user_weights = user_weights;
  if (pass == Pass::kForward) {
    SetPrimitive<dnnl::convolution_forward>(forward, forward.weights_desc(), &entry);
  } else if (pass == Pass::kInputGradient) {
    auto backward = dnnl::convolution_backward_data::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, padding_l,
        padding_r, forward, attr);
    SetPrimitive<dnnl::convolution_backward_data>(backward, backward.weights_desc(), &entry);
  } else {
    auto backward = dnnl::convolution_backward_weights::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, padding_l,
        padding_r, forward, attr);
    SetPrimitive<dnnl::convolution_backward_weights>(backward, backward.diff_weights_desc(),
                                                     &entry);
  }
  entry.reorder_weights = entry.primitive_weights != user_weights;
  if (entry.reorder_weights) {
    entry.weights_reorder =
        pass == Pass::kKernelGradient
            ? dnnl::reorder(dnnl::reorder::primitive_desc(engine, entry.primitive_weights, engine,
                                                          user_weights))
            : dnnl::reorder(dnnl::reorder::primitive_desc(engine, user_weights, engine,
                                                          entry.primitive_weights));
  }
  return entry;
}

// The cached primitive for (pass, geometry), created on first use.
const Entry& GetEntry(Pass pass, const Geometry& g) {
  using Key = std::array<int64_t, 17>;
  static std::mutex mutex;
  static auto* cache = new std::map<Key, std::unique_ptr<Entry>>();
  const Key key = {static_cast<int64_t>(pass), g.n, g.h, g.w, g.ic, g.oc, g.groups, g.kh, g.kw,
                   g.oh, g.ow,
                   g.stride_h, g.stride_w, g.pad_top, g.pad_bottom, g.pad_left, g.pad_right};
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache->find(key);
  if (found == cache->end()) {
    found = cache->emplace(key, std::make_unique<Entry>(MakeEntry(pass, g))).first;
  }
  return *found->second;
}

// Pointers to one pass's arrays: `activation` (x or dx), `weights` (the kernel or its gradient,
// in our layout) and `output` (y or dy). Which are read and which written depends on the pass.
struct Arrays {
  float* activation;
  float* weights;
  float* output;
};

// Runs `entry`'s pass on the images [begin, begin + chunk.n) of the arrays with one thread;
// `weights` is the kernel (or its gradient) in the primitive's layout.
void RunChunk(Pass pass, const Entry& entry, const Geometry& chunk, int64_t begin,
              const Arrays& arrays, float* weights) {
  omp_set_num_threads(1);  // oneDNN runs its work on this thread alone
  const auto& engine = Engine();
  dnnl::stream stream(engine);
  const auto& g = chunk;
  memory src(
      memory::desc({g.n, g.ic, g.h, g.w}, memory::data_type::f32, memory::format_tag::nhwc),
      engine, arrays.activation + begin * g.h * g.w * g.ic);
  memory dst(
      memory::desc({g.n, g.oc, g.oh, g.ow}, memory::data_type::f32, memory::format_tag::nhwc),
      engine, arrays.output + begin * g.oh * g.ow * g.oc);
  memory primitive_weights(entry.primitive_weights, engine, weights);
  thread_local std::vector<uint8_t> scratch;
  scratch.resize(std::max(scratch.size(), entry.scratchpad.get_size()));
  memory scratchpad(entry.scratchpad, engine, scratch.data());
  const int weights_arg = pass == Pass::kKernelGradient ? DNNL_ARG_DIFF_WEIGHTS : DNNL_ARG_WEIGHTS;
  const int src_arg = pass == Pass::kInputGradient ? DNNL_ARG_DIFF_SRC : DNNL_ARG_SRC;
  const int dst_arg = pass == Pass::kForward ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST;
  entry.primitive.execute(stream, {{src_arg, src},
                                   {weights_arg, primitive_weights},
                                   {dst_arg, dst},
                                   {DNNL_ARG_SCRATCHPAD, scratchpad}});
  stream.wait();
}

// Work shared between the calling thread and the tasks it schedules on XLA's thread pool. Chunks
// are claimed from `next`; the caller waits only for chunks already claimed, so a task that starts
// late (its pool busy) finds nothing left, and the call never waits on a queued task.
struct SharedWork {
  std::atomic<int64_t> next{0};
  int64_t chunks = 0;
  std::mutex mutex;
  std::condition_variable finished;
  int64_t done = 0;
  std::string error;
  std::vector<float> weights;  // the kernel, or each chunk's kernel gradient, in oneDNN's layout
};

// Runs `pass` over the batch split into equal chunks of images, at most `max_threads` and one per
// thread of XLA's intra-op thread pool (the calling thread included). The kernel is converted to
// oneDNN's layout once per call; the kernel gradient sums the chunks' gradients.
ffi::Error Run(Pass pass, const Geometry& g, ffi::ThreadPool pool, int64_t max_threads,
               const Arrays& arrays) {
  int64_t chunks = std::max<int64_t>(1, std::min({max_threads, pool.num_threads(), g.n}));
  while (g.n % chunks) --chunks;
  Geometry chunk = g;
  chunk.n = g.n / chunks;
  auto work = std::make_shared<SharedWork>();
  work->chunks = chunks;
  try {
    omp_set_num_threads(1);
    const Entry& entry = GetEntry(pass, chunk);
    const auto& engine = Engine();
    dnnl::stream stream(engine);
    memory user_weights(entry.user_weights, engine, arrays.weights);
    const int64_t weights_size = entry.primitive_weights.get_size() / sizeof(float);
    const bool gradient = pass == Pass::kKernelGradient;
    if (gradient || entry.reorder_weights) {
      work->weights.resize((gradient ? chunks : 1) * weights_size);
    }
    if (!gradient && entry.reorder_weights) {
      memory blocked(entry.primitive_weights, engine, work->weights.data());
      entry.weights_reorder.execute(stream, user_weights, blocked);
      stream.wait();
    }
    float* weights = work->weights.empty() ? arrays.weights : work->weights.data();
    auto run_chunks = [pass, &entry, chunk, arrays, work, weights, gradient, weights_size]() {
      for (int64_t i = work->next++; i < work->chunks; i = work->next++) {
        std::string error;
        try {
          RunChunk(pass, entry, chunk, i * chunk.n, arrays,
                   weights + (gradient ? i * weights_size : 0));
        } catch (const dnnl::error& e) {
          error = std::string("conv_onednn: oneDNN: ") + e.what();
        }
        std::lock_guard<std::mutex> lock(work->mutex);
        if (!error.empty()) work->error = error;
        if (++work->done == work->chunks) work->finished.notify_all();
      }
    };
    for (int64_t t = 1; t < chunks; ++t) pool.Schedule([run_chunks] { run_chunks(); });
    run_chunks();
    {
      std::unique_lock<std::mutex> lock(work->mutex);
      work->finished.wait(lock, [&work] { return work->done == work->chunks; });
      if (!work->error.empty()) return ffi::Error::Internal(work->error);
    }
    if (gradient) {
      for (int64_t i = 1; i < chunks; ++i) {
        const float* partial = weights + i * weights_size;
        for (int64_t j = 0; j < weights_size; ++j) weights[j] += partial[j];
      }
      memory blocked(entry.primitive_weights, engine, weights);
      if (entry.reorder_weights) {
        entry.weights_reorder.execute(stream, blocked, user_weights);
        stream.wait();
      } else {
        std::copy(weights, weights + weights_size, arrays.weights);
      }
    }
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("conv_onednn: oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

// The geometry from the activation (N, H, W, IC), output (N, OH, OW, OC) and kernel
// (kh, kw, IC / groups, OC) shapes and the attributes; an error when they do not describe one
// convolution.
ffi::ErrorOr<Geometry> MakeGeometry(ffi::Span<const int64_t> activation,
                                    ffi::Span<const int64_t> output,
                                    ffi::Span<const int64_t> kernel, int64_t groups,
                                    int64_t stride_h,
                                    int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                                    int64_t pad_left, int64_t pad_right) {
  if (activation.size() != 4 || output.size() != 4 || kernel.size() != 4) {
    return ffi::Unexpected<ffi::Error>(
        ffi::Error::InvalidArgument("conv_onednn: expected NHWC arrays and a 4-D kernel"));
  }
  Geometry g{activation[0], activation[1], activation[2], activation[3], output[3],
             groups,        kernel[0],     kernel[1],     output[1],     output[2],
             stride_h,      stride_w,      pad_top,       pad_bottom,    pad_left,
             pad_right};
  const bool consistent =
      groups > 0 && output[0] == g.n && g.ic % groups == 0 && g.oc % groups == 0 &&
      kernel[2] * groups == g.ic && kernel[3] == g.oc && g.stride_h > 0 && g.stride_w > 0 &&
      g.oh == (g.h + g.pad_top + g.pad_bottom - g.kh) / g.stride_h + 1 &&
      g.ow == (g.w + g.pad_left + g.pad_right - g.kw) / g.stride_w + 1;
  if (!consistent) {
    return ffi::Unexpected<ffi::Error>(
        ffi::Error::InvalidArgument("conv_onednn: inconsistent shapes and attributes"));
  }
  return g;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                   int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                   int64_t groups, int64_t max_threads) {
  auto g = MakeGeometry(x.dimensions(), y->dimensions(), kernel.dimensions(), groups, stride_h,
                        stride_w,
                        pad_top, pad_bottom, pad_left, pad_right);
  if (g.has_error()) return g.error();
  return Run(Pass::kForward, *g, pool, max_threads, {x.typed_data(), kernel.typed_data(), y->typed_data()});
}

ffi::Error InputGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                         ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx,
                         int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                         int64_t pad_left, int64_t pad_right, int64_t groups,
                         int64_t max_threads) {
  auto g = MakeGeometry(dx->dimensions(), dy.dimensions(), kernel.dimensions(), groups, stride_h,
                        stride_w, pad_top, pad_bottom, pad_left, pad_right);
  if (g.has_error()) return g.error();
  return Run(Pass::kInputGradient, *g, pool, max_threads,
             {dx->typed_data(), kernel.typed_data(), dy.typed_data()});
}

ffi::Error KernelGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride_h,
                          int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                          int64_t pad_left, int64_t pad_right, int64_t groups,
                         int64_t max_threads) {
  auto g = MakeGeometry(x.dimensions(), dy.dimensions(), dkernel->dimensions(), groups, stride_h,
                        stride_w, pad_top, pad_bottom, pad_left, pad_right);
  if (g.has_error()) return g.error();
  return Run(Pass::kKernelGradient, *g, pool, max_threads,
             {x.typed_data(), dkernel->typed_data(), dy.typed_data()});
}

// Binds the thread pool, two arrays, one result and the attributes.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right")
      .Attr<int64_t>("groups")
      .Attr<int64_t>("max_threads");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvInputGradient, InputGradient, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvKernelGradient, KernelGradient, Binding());

// The implementation oneDNN picks for a pass (0 forward, 1 input gradient, 2 kernel gradient) of
// the geometry `sizes` (n, h, w, c, kh, kw, oh, ow, strides, paddings), e.g. "jit_dw:avx512_core".
extern "C" const char* ConvImplementation(int64_t pass, const int64_t* sizes) {
  static thread_local std::string name;
  Geometry g{sizes[0], sizes[1], sizes[2],  sizes[3],  sizes[4],  sizes[5],  sizes[6],  sizes[7],
             sizes[8], sizes[9], sizes[10], sizes[11], sizes[12], sizes[13], sizes[14], sizes[15]};
  try {
    omp_set_num_threads(1);
    name = GetEntry(static_cast<Pass>(pass), g).implementation;
  } catch (const dnnl::error& error) {
    name = std::string("error: ") + error.what();
  }
  return name.c_str();
}
