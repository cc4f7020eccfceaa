// A CPU emulator of the small subset of CUDA that the kernels of csrc/cuda/ use, so that
// the kernel code itself (indexing, tiling, barriers, warp shuffles, the skip predicate,
// vector loads) is tested on machines without a GPU. Test tooling only: it is compiled
// (with KK_CUDA_EMULATE defined) by tests/cuda_emulation.py, never into the package.
//
// Model: a launch runs its blocks one after another; the threads of a block are
// cooperative fibers on the calling OS thread, switched at __syncthreads()
// and at warp shuffles. Consequences that make it a useful test:
//   * a thread runs until its next barrier, so a missing __syncthreads() between writing
//     shared memory and reading another thread's element reads stale data (wrong results);
//   * a barrier that not every thread of the block reaches is reported as a deadlock;
//   * a misaligned vector (128-bit) access is reported as an error;
//   * block-shared memory (`KK_SHARED`, a function-local static here) is filled with NaN
//     bytes before every block, so reading an element nobody wrote poisons the result.
// What it cannot show: performance, memory-model races between blocks, compiler or
// architecture specifics (FMA contraction differs), out-of-bounds global accesses.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace kk_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct Barrier {
  int expected = 0;
  int count = 0;
  unsigned gen = 0;
};

// Context switch. On x86-64 a minimal switch of the callee-saved registers and the stack
// pointer (glibc's swapcontext makes a system call per switch, ~30x slower); elsewhere
// ucontext.
#if defined(__x86_64__) && !defined(KK_EMU_UCONTEXT)
#define KK_EMU_ASM_SWITCH 1
extern "C" void kk_emu_switch(void** save_sp, void* new_sp);
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".type kk_emu_switch, @function\n"
    "kk_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size kk_emu_switch, .-kk_emu_switch\n");
struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

struct Fiber {
  Context ctx;
  bool done = false;
  Barrier* waiting = nullptr;
  unsigned wait_gen = 0;
  unsigned tid = 0;
};

struct SharedRegion {
  void* ptr;
  size_t bytes;
};

struct State {
  Context sched;
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  unsigned cur = 0;
  Dim3 block_idx, grid_dim;
  unsigned block_threads = 0;
  Barrier block_bar;
  std::vector<Barrier> warp_bars;
  std::vector<uint64_t> shfl;  // one 8-byte slot per thread
  const std::function<void()>* body = nullptr;
  std::string error;
  std::vector<SharedRegion> shared;  // every KK_SHARED array seen so far (poisoned per launch)
};

constexpr size_t kStackBytes = 256 * 1024;

inline State& state() {
  static State s;
  return s;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void fail(const std::string& msg) {
  State& s = state();
  if (s.error.empty()) s.error = msg;
}

inline Fiber& current() { return state().fibers[state().cur]; }

inline void switch_to(Context& save, Context& next) {
#if defined(KK_EMU_ASM_SWITCH)
  kk_emu_switch(&save.sp, next.sp);
#else
  swapcontext(&save.uc, &next.uc);
#endif
}

inline void yield_to_scheduler() {
  Fiber& f = current();
  switch_to(f.ctx, state().sched);
}

inline void barrier_wait(Barrier& b) {
  Fiber& f = current();
  const unsigned gen = b.gen;
  if (++b.count == b.expected) {
    b.count = 0;
    ++b.gen;
    f.waiting = nullptr;
  } else {
    f.waiting = &b;
    f.wait_gen = gen;
  }
  yield_to_scheduler();
}

inline void sync_threads() { barrier_wait(state().block_bar); }

template <typename T>
inline T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  State& s = state();
  const unsigned tid = current().tid;
  const unsigned warp = tid / 32, lane = tid % 32;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  s.shfl[tid] = raw;
  barrier_wait(s.warp_bars[warp]);
  const uint64_t other = s.shfl[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  barrier_wait(s.warp_bars[warp]);  // nobody overwrites a slot before every lane read it
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

// Registers a KK_SHARED array the first time its kernel runs; poisoned before each launch.
inline bool register_shared(void* ptr, size_t bytes) {
  state().shared.push_back({ptr, bytes});
  std::memset(ptr, 0xff, bytes);  // NaN in every float / double lane
  return true;
}

inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    fail(std::string("misaligned ") + std::to_string(bytes * 8) + "-bit vector access in " +
         what);
  }
}

inline void trampoline() {
  State& s = state();
  (*s.body)();
  s.fibers[s.cur].done = true;
#if defined(KK_EMU_ASM_SWITCH)
  for (;;) yield_to_scheduler();  // entered by a return, so it must never return
#endif
}

inline void make_fiber(Fiber& f, char* stack, size_t bytes) {
#if defined(KK_EMU_ASM_SWITCH)
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                  // keeps the entry's stack ABI-aligned
  *--sp = reinterpret_cast<void*>(&trampoline);     // `ret` of the first switch enters here
  for (int r = 0; r < 6; ++r) *--sp = nullptr;      // rbp rbx r12 r13 r14 r15
  --sp;                                             // mxcsr and x87 control word
  uint32_t mxcsr;
  uint16_t fpucw;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  f.ctx.sp = sp;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = stack;
  f.ctx.uc.uc_stack.ss_size = bytes;
  f.ctx.uc.uc_link = &state().sched.uc;
  makecontext(&f.ctx.uc, trampoline, 0);
#endif
}

inline void run(Dim3 grid, unsigned threads, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  State& s = state();
  if (threads == 0 || threads % 32 != 0 || threads > 1024) {
    throw std::runtime_error("emulated launch: block size must be a multiple of 32 <= 1024");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("emulated launch: invalid grid (" + std::to_string(grid.x) + ", " +
                             std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
  }
  s.error.clear();
  s.body = &body;
  s.grid_dim = grid;
  s.block_threads = threads;
  s.fibers.assign(threads, Fiber());
  if (s.stacks.size() < threads * kStackBytes) s.stacks.resize(threads * kStackBytes);
  s.shfl.assign(threads, 0);
  for (unsigned bz = 0; bz < grid.z && s.error.empty(); ++bz) {
    for (unsigned by = 0; by < grid.y && s.error.empty(); ++by) {
      for (unsigned bx = 0; bx < grid.x && s.error.empty(); ++bx) {
        s.block_idx = Dim3{bx, by, bz};
        for (auto& region : s.shared) std::memset(region.ptr, 0xff, region.bytes);
        s.block_bar = Barrier{static_cast<int>(threads), 0, 0};
        s.warp_bars.assign(threads / 32, Barrier{32, 0, 0});
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = s.fibers[t];
          f.done = false;
          f.waiting = nullptr;
          f.tid = t;
          make_fiber(f, s.stacks.data() + t * kStackBytes, kStackBytes);
        }
        for (;;) {
          bool alive = false, progressed = false;
          for (unsigned t = 0; t < threads; ++t) {
            Fiber& f = s.fibers[t];
            if (f.done) continue;
            alive = true;
            if (f.waiting != nullptr && f.waiting->gen == f.wait_gen) continue;
            f.waiting = nullptr;
            s.cur = t;
            switch_to(s.sched, f.ctx);
            progressed = true;
          }
          if (!alive) break;
          if (!progressed) {
            fail("deadlock in block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " +
                 std::to_string(bz) + "): a barrier that not every thread reaches");
            break;
          }
        }
      }
    }
  }
  s.body = nullptr;
  if (!s.error.empty()) throw std::runtime_error("emulated CUDA kernel: " + s.error);
}

template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), Dim3 grid, unsigned threads, Args... args) {
  std::function<void()> body = [&]() { kernel(args...); };
  run(grid, threads, body);
}

}  // namespace kk_emu
