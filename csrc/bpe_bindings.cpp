// Python bindings of the C++ BPE core: the extension module sparrow._bpe.
// The Python-facing API (allowed_special sets, file reading, errors) lives in sparrow/tokenizer/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "bpe/encoder.h"
#include "bpe/pretokenize.h"
#include "bpe/transcode.h"
#include "bpe/unicode.h"

namespace py = pybind11;
using sparrow::bpe::Encoder;
using sparrow::bpe::Pattern;

namespace {

// Texts at least this long are encoded without the GIL (other Python threads run meanwhile); for
// shorter ones releasing and re-taking it would cost more than the encode.
constexpr size_t kReleaseGilBytes = 2048;
// encode_ordinary's reused output keeps up to this many ids (4 MiB) of capacity between calls.
constexpr size_t kKeptIds = size_t{1} << 20;

// A str's text as the encoder reads it: UTF-8 that CPython already holds (an ASCII str is its own UTF-8,
// and a str whose UTF-8 was asked for before keeps a copy), or else its code units, which utf8_text
// converts (bpe/transcode.h) into a per-thread buffer instead of asking CPython to make and keep a UTF-8
// copy: CPython's converter was 15-25% of a cold encode_ordinary on mixed-script text. Reading the units
// needs no GIL: a str is immutable and the caller holds a reference to it.
struct StrText {
  const void* data = nullptr;
  size_t length = 0;  // bytes of UTF-8 (kind 0), else code units
  int kind = 0;       // 0: data is UTF-8; 1, 2 or 4: bytes per code unit
};

StrText str_text(const py::handle& obj) {
  PyObject* o = obj.ptr();
  if (!PyUnicode_Check(o)) throw py::type_error("expected str, got " + std::string(Py_TYPE(o)->tp_name));
#if PY_VERSION_HEX < 0x030C0000
  if (PyUnicode_READY(o) != 0) throw py::error_already_set();
#endif
  const size_t n = static_cast<size_t>(PyUnicode_GET_LENGTH(o));
  if (PyUnicode_IS_ASCII(o)) return {PyUnicode_DATA(o), n, 0};
#if !defined(Py_GIL_DISABLED) && PY_VERSION_HEX < 0x030F0000
  // (The free-threaded build fills this field under a lock of its own; there the units are converted.)
  const auto* compact = reinterpret_cast<const PyCompactUnicodeObject*>(o);
  if (compact->utf8) return {compact->utf8, static_cast<size_t>(compact->utf8_length), 0};
#endif
  return {PyUnicode_DATA(o), n, static_cast<int>(PyUnicode_KIND(o))};
}

// The per-thread buffer utf8_text converts into, and the most it keeps between calls (16 MiB).
constexpr size_t kKeptUtf8Bytes = size_t{16} << 20;
std::vector<unsigned char>& utf8_buffer() {
  static thread_local std::vector<unsigned char> buf;
  return buf;
}
void trim_utf8_buffer() {
  std::vector<unsigned char>& buf = utf8_buffer();
  if (buf.size() > kKeptUtf8Bytes) std::vector<unsigned char>().swap(buf);
}

// Sets s to the UTF-8 of t (valid until the thread's next utf8_text); false when the text holds a
// surrogate, which UTF-8 cannot encode (raise_utf8_error then raises CPython's own error).
bool utf8_text(const StrText& t, std::string_view& s) {
  if (t.kind == 0) {
    s = std::string_view(static_cast<const char*>(t.data), t.length);
    return true;
  }
  std::vector<unsigned char>& buf = utf8_buffer();
  const size_t need = sparrow::bpe::utf8_capacity(t.length, static_cast<size_t>(t.kind));
  if (buf.size() < need) buf.resize(need);
  size_t len = 0;
  switch (t.kind) {
    case 1: len = sparrow::bpe::utf8_from_latin1(static_cast<const uint8_t*>(t.data), t.length, buf.data()); break;
    case 2: len = sparrow::bpe::utf8_from_ucs2(static_cast<const uint16_t*>(t.data), t.length, buf.data()); break;
    default: len = sparrow::bpe::utf8_from_ucs4(static_cast<const uint32_t*>(t.data), t.length, buf.data()); break;
  }
  if (len == sparrow::bpe::kHasSurrogate) return false;
  s = std::string_view(reinterpret_cast<const char*>(buf.data()), len);
  return true;
}

// CPython's UnicodeEncodeError for a str that utf8_text refused (GIL held).
[[noreturn]] void raise_utf8_error(const py::handle& obj) {
  Py_ssize_t size = 0;
  if (!PyUnicode_AsUTF8AndSize(obj.ptr(), &size)) throw py::error_already_set();
  throw py::value_error("str holds a surrogate code point, which UTF-8 cannot encode");
}

// The UTF-8 of a str, for calls that keep the GIL (valid until the thread's next utf8_text).
std::string_view utf8_view(const py::handle& obj) {
  std::string_view s;
  if (!utf8_text(str_text(obj), s)) raise_utf8_error(obj);
  return s;
}

// Calls encode(utf8) on the text of one str: converted and encoded without the GIL when it is long
// enough for that to pay, CPython's error raised for a surrogate afterwards (GIL held on entry).
template <class F>
void with_utf8(const py::handle& text, F&& encode) {
  const StrText t = str_text(text);
  bool ok = false;
  auto run = [&] {
    std::string_view s;
    if ((ok = utf8_text(t, s))) encode(s);
  };
  if (t.length >= kReleaseGilBytes) {
    py::gil_scoped_release nogil;
    run();
  } else {
    run();
  }
  trim_utf8_buffer();
  if (!ok) raise_utf8_error(text);
}

// Python ints for ids 0..size-1, made once per process and shared by every list we return: building
// a list of n ids is then n reference-count increments instead of n int allocations (and freeing the
// list frees no ints). Grown to the largest vocabulary seen; only touched with the GIL held.
std::vector<PyObject*>& id_objects() {
  static std::vector<PyObject*> objs;
  return objs;
}

// The shared ints live as long as the process, so their references can be paid for once: each gets a
// reference count no program can use up (3.12+: the immortal value itself), and a list of ids then
// takes its items without an increment, so building it writes nothing to the ints (on cold text they
// are DRAM misses, one per distinct id; the increments were ~18% of a warm encode_ordinary of prose).
// Freeing the list still decrements them, harmlessly. Builds without the GIL keep the increments.
#if defined(Py_GIL_DISABLED)
constexpr bool kPrepaidIds = false;
#else
constexpr bool kPrepaidIds = true;
#endif

void ensure_id_objects(size_t size) {
  auto& objs = id_objects();
  objs.reserve(size);
  while (objs.size() < size) {
    PyObject* v = PyLong_FromSize_t(objs.size());
    if (!v) throw py::error_already_set();
    if constexpr (kPrepaidIds) {
#if PY_VERSION_HEX >= 0x030C0000 && defined(_Py_IMMORTAL_REFCNT)
      Py_SET_REFCNT(v, _Py_IMMORTAL_REFCNT);
#else
      Py_SET_REFCNT(v, static_cast<Py_ssize_t>(1) << 60);  // 10^18 decrements from zero
#endif
    }
    objs.push_back(v);
  }
}

// Stores the shared ints of ids[0, n) into a new list's slots. Ids past the shared ints (none from a
// loaded encoder: they are made up to its vocabulary size) are left NULL for fill_missing.
// Returns false when it left any.
bool fill_items(PyObject** items, const uint32_t* id, size_t n) {
  const auto& objs = id_objects();
  PyObject* const* const obj = objs.data();
  const size_t cached = objs.size();
  bool all = true;
  // Without prepaid counts the increments touch objects scattered over megabytes (one per vocabulary
  // id): prefetch each for writing a few ids ahead, so those cache misses overlap instead of stalling
  // one after another.
  constexpr size_t kAhead = 8;
  if constexpr (!kPrepaidIds) {
    for (size_t i = 0; i < n && i < kAhead; ++i)
      if (id[i] < cached) __builtin_prefetch(obj[id[i]], 1);
  }
  for (size_t i = 0; i < n; ++i) {
    if constexpr (!kPrepaidIds) {
      if (i + kAhead < n && id[i + kAhead] < cached) __builtin_prefetch(obj[id[i + kAhead]], 1);
    }
    if (id[i] < cached) {
      PyObject* v = obj[id[i]];
      if constexpr (!kPrepaidIds) Py_INCREF(v);
      items[i] = v;
    } else {
      items[i] = nullptr;  // the slots may not be zeroed (new_id_list)
      all = false;
    }
  }
  return all;
}

// A new list of n slots for fill_items to write, GIL held. PyList_New zeroes its slots (calloc), a
// pass over memory that fill_items then writes again; for the lists of a batch that pass ran serially
// with the GIL held, before the parallel fill, and on fresh memory it is where the page faults landed.
// Here the slots are left as they are and fill_items stores every one (NULL where it made no int), so
// the memory is written once, by the filling thread. Until then the list must reach no Python code: its
// callers fill it before returning it, keep the collector off it, and on failure set its size to 0
// (abandon_unfilled) so that freeing it reads no slot. Builds where a list's layout is not CPython's
// classic one (free-threaded) take PyList_New.
// (A macro, not a constant: new_id_list reaches into PyListObject, absent from the other builds.)
#if !defined(Py_GIL_DISABLED) && !defined(Py_LIMITED_API) && PY_VERSION_HEX < 0x030F0000
#define SPARROW_UNZEROED_LISTS 1
// Builds whose ids are not prepaid (free-threaded) fill their lists under the GIL with increments; their
// lists come zeroed from PyList_New, so an unfilled one may be freed as it is.
static_assert(kPrepaidIds, "unzeroed lists are only filled on the prepaid path");
#endif

PyObject* new_id_list(size_t n) {
#if defined(SPARROW_UNZEROED_LISTS)
  if (n == 0 || n > static_cast<size_t>(PY_SSIZE_T_MAX) / sizeof(PyObject*))
    return PyList_New(static_cast<Py_ssize_t>(n));
  auto** items = static_cast<PyObject**>(PyMem_Malloc(n * sizeof(PyObject*)));
  if (!items) return PyErr_NoMemory();
  PyObject* list = PyList_New(0);  // may run a collection: the slots are not attached yet
  if (!list) {
    PyMem_Free(items);
    return nullptr;
  }
  auto* l = reinterpret_cast<PyListObject*>(list);
  l->ob_item = items;
  l->allocated = static_cast<Py_ssize_t>(n);
  Py_SET_SIZE(l, static_cast<Py_ssize_t>(n));
  return list;
#else
  return PyList_New(static_cast<Py_ssize_t>(n));
#endif
}

// A list from new_id_list that will not be filled: empty, so that freeing it reads no slot.
void abandon_unfilled(PyObject* list) { Py_SET_SIZE(reinterpret_cast<PyVarObject*>(list), 0); }

// Makes the ints fill_items left out (GIL held). On failure the list keeps NULL slots, which freeing it
// allows.
void fill_missing(PyObject** items, const uint32_t* id, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (items[i]) continue;
    items[i] = PyLong_FromUnsignedLong(id[i]);
    if (!items[i]) throw py::error_already_set();
  }
}

PyObject** list_items(PyObject* list) { return reinterpret_cast<PyListObject*>(list)->ob_item; }

// Fills a new list of ids.size() slots with the ids (GIL held).
void fill_list(PyObject* list, const std::vector<uint32_t>& ids) {
  if (!fill_items(list_items(list), ids.data(), ids.size())) fill_missing(list_items(list), ids.data(), ids.size());
}

py::list to_list(const std::vector<uint32_t>& ids) {
  py::list list = py::reinterpret_steal<py::list>(new_id_list(ids.size()));
  if (!list) throw py::error_already_set();
  fill_list(list.ptr(), ids);
  return list;
}

// Loaders hand encoders to Python through this, so that their ids have shared int objects.
std::unique_ptr<Encoder> with_id_objects(std::unique_ptr<Encoder> e) {
  ensure_id_objects(e->vocab_size());
  return e;
}

uint32_t to_id(PyObject* h, size_t vocab_size) {
  long long v = PyLong_AsLongLong(h);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (v < 0 || static_cast<unsigned long long>(v) >= vocab_size)
    throw py::index_error("token id " + std::to_string(v) + " is out of range (vocab size " + std::to_string(vocab_size) + ")");
  return static_cast<uint32_t>(v);
}

std::vector<uint32_t> to_ids(const py::iterable& ids, size_t vocab_size) {
  std::vector<uint32_t> out;
  if (PyList_Check(ids.ptr()) || PyTuple_Check(ids.ptr())) {
    // Lists and tuples (what encode returns) are read by index, without the iterator protocol.
    PyObject* seq = ids.ptr();
    const bool list = PyList_Check(seq);
    const Py_ssize_t n = list ? PyList_GET_SIZE(seq) : PyTuple_GET_SIZE(seq);
    out.resize(static_cast<size_t>(n));
    bool exact = true;  // only exact ints: converting anything else may run Python code that edits the list
    for (Py_ssize_t i = 0; i < n && exact; ++i) {
      PyObject* h = list ? PyList_GET_ITEM(seq, i) : PyTuple_GET_ITEM(seq, i);
      exact = PyLong_CheckExact(h);
      if (exact) out[static_cast<size_t>(i)] = to_id(h, vocab_size);
    }
    if (exact) return out;
    out.clear();
  }
  for (const auto& h : ids) out.push_back(to_id(h.ptr(), vocab_size));
  return out;
}

// Texts released from the GIL: `keep` holds the str objects, so their data stays valid and unchanged.
struct Batch {
  std::vector<py::object> keep;
  std::vector<StrText> texts;
  // Set by a worker whose text holds a surrogate; rethrow_refused raises CPython's error for the first.
  std::vector<char> refused;

  // The UTF-8 of text i in a worker thread (converted there, so a batch converts in parallel), or false.
  bool utf8(size_t i, std::string_view& s) {
    if (utf8_text(texts[i], s)) return true;
    refused[i] = 1;
    return false;
  }
  void rethrow_refused() const {  // GIL held
    for (size_t i = 0; i < refused.size(); ++i)
      if (refused[i]) raise_utf8_error(keep[i]);
  }
};

Batch collect(const py::iterable& texts) {
  Batch b;
  for (const auto& t : texts) {
    b.texts.push_back(str_text(t));
    b.keep.push_back(py::reinterpret_borrow<py::object>(t));
  }
  b.refused.assign(b.texts.size(), 0);
  return b;
}

size_t thread_count(py::object num_threads, size_t work_items) {
  size_t n = 0;
  if (num_threads.is_none()) {
    n = std::max(1u, std::thread::hardware_concurrency());
  } else {
    long long v = num_threads.cast<long long>();
    if (v < 1) throw py::value_error("num_threads must be >= 1");
    n = static_cast<size_t>(v);
  }
  return std::max<size_t>(1, std::min(n, work_items));
}

// Worker threads that outlive the call: each keeps its per-thread piece cache (the encoder's, 4 MiB)
// warm from one batch to the next, so `sparrow data tokenize`, which calls encode_documents once per
// 8 MB batch, does not start every batch on cold caches, and no thread is created per call. Threads
// are made on demand (never more than a call asked for) and then wait on a condition variable. The
// pool is deliberately leaked: its threads may still be waiting when the process exits. A forked child
// (multiprocessing) drops the parent's pool, whose threads do not exist there, and makes its own.
class WorkerPool {
 public:
  // Call with the GIL held (it serializes creation; fork() in Python holds it too).
  static WorkerPool& get() {
    static bool registered = false;
    if (!registered) {
#if defined(__unix__) || defined(__APPLE__)
      pthread_atfork(nullptr, nullptr, [] { instance() = nullptr; });
#endif
      registered = true;
    }
    if (!instance()) instance() = new WorkerPool();
    return *instance();
  }

  // Runs job() on `extra` pool threads and on the calling thread; returns when every run has returned.
  // job must not throw. One parallel section at a time (concurrent callers queue).
  void run(size_t extra, const std::function<void()>& job) {
    std::lock_guard<std::mutex> section(section_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (threads_ < extra) {
        std::thread(&WorkerPool::loop, this, threads_, generation_).detach();
        ++threads_;
      }
      job_ = &job;
      wanted_ = extra;
      pending_ = extra;
      ++generation_;
    }
    wake_.notify_all();
    job();
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  static WorkerPool*& instance() {
    static WorkerPool* pool = nullptr;
    return pool;
  }

  void loop(size_t index, uint64_t seen) {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      wake_.wait(lk, [&] { return generation_ != seen && index < wanted_; });
      seen = generation_;
      const std::function<void()>* job = job_;
      lk.unlock();
      (*job)();
      lk.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }

  std::mutex section_mu_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void()>* job_ = nullptr;
  size_t threads_ = 0, wanted_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

// Runs fn(i) for i in [0, count) on `threads` threads (the caller and threads - 1 pool workers) without
// the GIL; the first exception is rethrown once the GIL is back. Call with the GIL held.
template <class F>
void parallel_for(size_t count, size_t threads, F&& fn) {
  WorkerPool& pool = WorkerPool::get();
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto worker = [&]() {
    while (!failed.load(std::memory_order_relaxed)) {
      size_t i = next.fetch_add(1);
      if (i >= count) return;
      try {
        fn(i);
      } catch (...) {
        if (!failed.exchange(true)) error = std::current_exception();
      }
    }
  };
  {
    py::gil_scoped_release nogil;
    if (threads <= 1) {
      worker();
    } else {
      const std::function<void()> job(worker);
      pool.run(threads - 1, job);
    }
  }
  if (error) std::rethrow_exception(error);
}

// A batch's texts encoded on up to `num_threads` threads without the GIL, encode(utf8, ids) each; every
// text is converted in its worker thread, and a str holding a surrogate raises CPython's error afterwards.
template <class F>
std::vector<std::vector<uint32_t>> encode_each(const py::iterable& texts, py::object num_threads, F&& encode) {
  Batch b = collect(texts);
  std::vector<std::vector<uint32_t>> outs(b.texts.size());
  parallel_for(b.texts.size(), thread_count(num_threads, b.texts.size()), [&](size_t i) {
    std::string_view s;
    if (!b.utf8(i, s)) return;
    outs[i].reserve(s.size() / 3 + 4);
    encode(s, outs[i]);
    trim_utf8_buffer();
  });
  b.rethrow_refused();
  return outs;
}

// Holds CPython's cyclic collector off while a batch's lists are made, and restores its state after.
// A list is a container the collector tracks, so each new one counts towards the next collection, and
// collections during the loop (one per 700 lists, the older generations every tenth) would walk every
// id of the lists made so far, serially, with the GIL held: a third of a 2-thread encode_ordinary_batch
// of short Chinese documents. Paused, a caller that keeps the lists pays one walk at the next
// collection, and one that drops them pays none. (Lists of ints cannot form a cycle; they stay tracked,
// so a cycle a caller builds through them later is still found.)
class CollectorPaused {
 public:
  CollectorPaused() : was_enabled_(PyGC_Disable()) {}
  ~CollectorPaused() {
    if (was_enabled_) PyGC_Enable();
  }
  CollectorPaused(const CollectorPaused&) = delete;
  CollectorPaused& operator=(const CollectorPaused&) = delete;

 private:
  int was_enabled_;
};

// The lists of a batch's ids, filled on up to `threads` threads (GIL held on entry). Lists are made
// with the GIL held, then filled without it: a new list's slots are memory only this call can reach,
// and storing the shared ints writes nothing to them (prepaid counts), so the fill, a gather of one
// pointer per id, runs in parallel. The lists are untracked while they are filled, so a collection
// started by another thread meanwhile never walks a list being written. Each text's ids are freed by
// the thread that fills its list. (If a list failed to be made, the ones before it are emptied and freed
// untracked, which CPython allows.)
py::list to_lists(std::vector<std::vector<uint32_t>>& outs, size_t threads) {
  const size_t count = outs.size();
  py::list result(count);
  std::vector<PyObject*> lists(count);
  {
    // Paused only while the GIL is held, so no other thread ever sees the collector off.
    CollectorPaused paused;
    for (size_t i = 0; i < count; ++i) {
      PyObject* list = new_id_list(outs[i].size());
      if (!list) {
        for (size_t k = 0; k < i; ++k) abandon_unfilled(lists[k]);
        throw py::error_already_set();
      }
      PyList_SET_ITEM(result.ptr(), static_cast<Py_ssize_t>(i), list);  // result owns it from here
      lists[i] = list;
      if constexpr (kPrepaidIds) PyObject_GC_UnTrack(list);
    }
  }
  if constexpr (!kPrepaidIds) {  // each store is an increment: keep them under the GIL (zeroed lists)
    for (size_t i = 0; i < count; ++i) fill_list(lists[i], outs[i]);
    return result;
  }
  std::vector<char> partial(count, 0);
  parallel_for(count, threads, [&](size_t i) {
    if (!fill_items(list_items(lists[i]), outs[i].data(), outs[i].size())) partial[i] = 1;
    else std::vector<uint32_t>().swap(outs[i]);
  });
  for (PyObject* list : lists) PyObject_GC_Track(list);
  for (size_t i = 0; i < count; ++i)
    if (partial[i]) fill_list(lists[i], outs[i]);
  return result;
}

std::vector<char> mask_from(const Encoder& e, const std::vector<bool>& allowed) {
  if (allowed.size() != e.specials().size()) throw py::value_error("allowed mask has the wrong length");
  return std::vector<char>(allowed.begin(), allowed.end());
}

}  // namespace

PYBIND11_MODULE(_bpe, m) {
  m.doc() = "Sparrow's C++ byte-level BPE encoder (see sparrow.tokenizer for the Python API).";

  // Both derive from ValueError, so callers can catch them generically.
  py::register_exception<sparrow::bpe::DisallowedSpecialError>(m, "DisallowedSpecialError", PyExc_ValueError);
  py::register_exception<sparrow::bpe::FormatError>(m, "FormatError", PyExc_ValueError);

  m.def("pretokenize", [](py::handle text, const std::string& pattern) {
        const Pattern p = sparrow::bpe::pattern_from_name(pattern);
        std::string_view s = utf8_view(text);
        py::list out;
        const auto* u = reinterpret_cast<const unsigned char*>(s.data());
        sparrow::bpe::for_each_piece(p, u, s.size(), [&](size_t b, size_t e) {
          out.append(py::str(s.data() + b, e - b));
        });
        return out;
      },
      py::arg("text"), py::arg("pattern"),
      "Split text into pieces with a built-in pattern ('gpt2', 'cl100k', 'o200k', 'llama3', 'qwen2'), as the regex would.");

  m.def("char_flags_table", []() {
        std::string t(0x110000, '\0');
        for (uint32_t cp = 0; cp < 0x110000; ++cp) t[cp] = static_cast<char>(sparrow::bpe::char_flags(cp));
        return py::bytes(t);
      },
      "Flags of every code point (bit 0 letter, 1 number, 2 whitespace, 3 o200k upper class, 4 o200k lower class, 5 mark).");

  m.def("pattern_name", [](const std::string& name) { return std::string(sparrow::bpe::pattern_name(sparrow::bpe::pattern_from_name(name))); },
        "Canonical name of a split pattern; raises ValueError for unknown names.");

  py::class_<Encoder>(m, "Encoder")
      .def_static("from_hf_json", [](py::bytes data) {
            std::string s = data;
            std::unique_ptr<Encoder> e;
            {
              py::gil_scoped_release nogil;
              e = Encoder::from_hf_json(s);
            }
            return with_id_objects(std::move(e));
          }, py::arg("contents"))
      .def_static("from_tiktoken", [](py::bytes data, const std::string& pattern, const std::map<std::string, uint32_t>& specials) {
            std::string s = data;
            const Pattern p = sparrow::bpe::pattern_from_name(pattern);
            std::vector<std::pair<std::string, uint32_t>> sp(specials.begin(), specials.end());
            std::sort(sp.begin(), sp.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
            std::unique_ptr<Encoder> e;
            {
              py::gil_scoped_release nogil;
              e = Encoder::from_tiktoken(s, p, sp);
            }
            return with_id_objects(std::move(e));
          }, py::arg("contents"), py::arg("pattern"), py::arg("special_tokens"))
      .def("encode_ordinary", [](const Encoder& e, py::handle text) {
            // One output vector per thread, reused: no allocation per call for the many short texts of
            // a per-document loop. Released again after a call that made it large.
            static thread_local std::vector<uint32_t> out;
            out.clear();
            with_utf8(text, [&](std::string_view s) { e.encode_ordinary(s, out); });
            py::list ids = to_list(out);
            if (out.capacity() > kKeptIds) std::vector<uint32_t>().swap(out);
            return ids;
          }, py::arg("text"), "Token ids of text, special-token text encoded as ordinary text.")
      .def("encode", [](const Encoder& e, py::handle text, const std::vector<bool>& allowed, bool check_disallowed) {
            std::vector<char> mask = mask_from(e, allowed);
            std::vector<uint32_t> out;
            with_utf8(text, [&](std::string_view s) {
              out.reserve(s.size() / 3 + 4);
              e.encode(s, mask, check_disallowed, out);
            });
            return to_list(out);
          }, py::arg("text"), py::arg("allowed"), py::arg("check_disallowed"))
      .def("encode_batch", [](const Encoder& e, const py::iterable& texts, const std::vector<bool>& allowed,
                              bool check_disallowed, bool ordinary, py::object num_threads) {
            std::vector<char> mask = ordinary ? std::vector<char>() : mask_from(e, allowed);
            auto outs = encode_each(texts, num_threads, [&](std::string_view s, std::vector<uint32_t>& out) {
              if (ordinary) e.encode_ordinary(s, out);
              else e.encode(s, mask, check_disallowed, out);
            });
            return to_lists(outs, thread_count(num_threads, outs.size()));
          }, py::arg("texts"), py::arg("allowed"), py::arg("check_disallowed"), py::arg("ordinary"), py::arg("num_threads"))
      .def("encode_documents", [](const Encoder& e, const py::iterable& texts, int64_t separator, py::object num_threads) {
            // Corpus tokenization: the ids of every text (ordinary encoding) each followed by
            // `separator` (when >= 0), concatenated into one uint32 array.
            const auto outs = encode_each(texts, num_threads, [&](std::string_view s, std::vector<uint32_t>& out) {
              e.encode_ordinary(s, out);
              if (separator >= 0) out.push_back(static_cast<uint32_t>(separator));
            });
            size_t total = 0;
            for (const auto& o : outs) total += o.size();
            py::array_t<uint32_t> arr(static_cast<py::ssize_t>(total));
            uint32_t* dst = arr.mutable_data();
            for (const auto& o : outs) {
              std::copy(o.begin(), o.end(), dst);
              dst += o.size();
            }
            return arr;
          }, py::arg("texts"), py::arg("separator"), py::arg("num_threads"))
      .def("decode_bytes", [](const Encoder& e, const py::iterable& ids) {
            std::vector<uint32_t> v = to_ids(ids, e.vocab_size());
            std::string out;
            {
              py::gil_scoped_release nogil;
              e.decode(v.data(), v.size(), out);
            }
            return py::bytes(out);
          }, py::arg("ids"))
      .def("decode_bytes_batch", [](const Encoder& e, const py::iterable& batch, py::object num_threads) {
            // Ids are read with the GIL held (they are Python ints), decoded on the worker pool without it.
            std::vector<std::vector<uint32_t>> ids;
            for (const auto& item : batch) ids.push_back(to_ids(py::reinterpret_borrow<py::iterable>(item), e.vocab_size()));
            std::vector<std::string> outs(ids.size());
            parallel_for(ids.size(), thread_count(num_threads, ids.size()), [&](size_t i) {
              e.decode(ids[i].data(), ids[i].size(), outs[i]);
              std::vector<uint32_t>().swap(ids[i]);
            });
            py::list result(outs.size());
            for (size_t i = 0; i < outs.size(); ++i) result[i] = py::bytes(outs[i]);
            return result;
          }, py::arg("batch"), py::arg("num_threads"))
      .def("encode_piece", [](const Encoder& e, py::bytes piece) {
            std::string s = piece;
            std::vector<uint32_t> out;
            e.encode_piece(s, out);
            return to_list(out);
          }, py::arg("piece"), "BPE of one pre-tokenized piece (bytes), without splitting.")
      .def("token_to_id", [](const Encoder& e, py::bytes token) -> py::object {
            std::string s = token;
            int64_t id = e.token_id(s);
            if (id < 0) return py::none();
            return py::int_(id);
          }, py::arg("token"))
      .def("id_to_token", [](const Encoder& e, int64_t id) {
            if (id < 0 || !e.has_id(static_cast<uint32_t>(id)))
              throw py::index_error("token id " + std::to_string(id) + " is not in the vocabulary");
            return py::bytes(e.id_bytes(static_cast<uint32_t>(id)));
          }, py::arg("id"))
      .def_property_readonly("vocab_size", &Encoder::vocab_size)
      .def_property_readonly("num_merges", &Encoder::num_merges)
      .def_property_readonly("pattern", [](const Encoder& e) { return std::string(sparrow::bpe::pattern_name(e.pattern())); })
      .def_property_readonly("digit_split", [](const Encoder& e) {
            switch (e.digit_split()) {
              case sparrow::bpe::DigitSplit::kRuns: return std::string("runs");
              case sparrow::bpe::DigitSplit::kEach: return std::string("individual");
              default: return std::string("");
            }
          }, "The Digits pre-tokenizer before the split pattern: '', 'runs' or 'individual'.")
      .def_property_readonly("normalizer", [](const Encoder& e) { return e.normalizer(); },
                             "'' or 'NFC' (tokenizer.json normalizer the caller applies before encoding)")
      .def_property_readonly("special_tokens", [](const Encoder& e) {
            py::list out;
            for (const auto& s : e.specials()) out.append(py::make_tuple(py::str(s.text), s.id, s.special));
            return out;
          }, "List of (text, id, special) for added tokens; special=False ones are always split out.");
}
