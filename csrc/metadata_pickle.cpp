// The pickle of a checkpoint's Metadata, written from the object tree directly.
//
// pickle.dumps spends most of its time in the generic reduce protocol:
// object.__reduce_ex__, copyreg lookups and a fresh state per dataclass, about
// 9 µs per tensor of a checkpoint. The classes of DCP's metadata are known: a
// table built in Python (dcp_native/_metadata_pickle.py) says how each one
// pickles, checked against pickle itself, and this walks the tree once writing
// the opcodes pickle writes for it (protocol 4: MEMOIZE, STACK_GLOBAL, NEWOBJ,
// BUILD, REDUCE, batched SETITEMS/APPENDS, FRAMEs). Objects are memoized by
// identity, as pickle does, so shared objects stay shared. Anything outside
// the table makes it give up (None) and the caller falls back to pickle.
#include "metadata_pickle.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace dcp_native {

namespace {

constexpr size_t kFrameTarget = 64 * 1024;  // as pickle: a frame closes past 64 KiB
constexpr size_t kFrameHeader = 9;          // FRAME + 8-byte length
constexpr Py_ssize_t kBatch = 1000;         // items per SETITEMS / APPENDS, as pickle
constexpr int kMaxDepth = 200;

// Thrown when the tree holds something this pickler does not write.
struct GiveUp {};
// Thrown when a Python call failed (its error is set).
struct PythonError {};

// Pickle's memo: object address -> memo index, open addressing (the memo of a large
// checkpoint's metadata holds tens of thousands of entries; one node per entry costs more
// than the pickling).
class Memo {
 public:
  Memo() : slots_(size_t{1} << bits_) {}

  const uint32_t* find(PyObject* key) const {
    for (size_t i = slot(key);; i = (i + 1) & mask()) {
      const Slot& s = slots_[i];
      if (s.key == key) {
        return &s.value;
      }
      if (s.key == nullptr) {
        return nullptr;
      }
    }
  }

  void insert(PyObject* key, uint32_t value) {
    if ((size_ + 1) * 2 > slots_.size()) {
      grow();
    }
    place(key, value);
    ++size_;
  }

 private:
  struct Slot {
    PyObject* key = nullptr;
    uint32_t value = 0;
  };

  size_t mask() const { return slots_.size() - 1; }
  size_t slot(PyObject* key) const {
    return static_cast<size_t>((reinterpret_cast<uintptr_t>(key) * 0x9E3779B97F4A7C15ull) >> (64 - bits_));
  }
  void place(PyObject* key, uint32_t value) {
    size_t i = slot(key);
    while (slots_[i].key != nullptr) {
      i = (i + 1) & mask();
    }
    slots_[i] = Slot{key, value};
  }
  void grow() {
    std::vector<Slot> old(size_t{1} << (bits_ + 1));
    old.swap(slots_);
    ++bits_;
    for (const Slot& s : old) {
      if (s.key != nullptr) {
        place(s.key, s.value);
      }
    }
  }

  int bits_ = 12;
  std::vector<Slot> slots_;
  size_t size_ = 0;
};

class Pickler {
 public:
  Pickler(PyObject* globals, PyObject* classes) : globals_(globals), classes_(classes) {
    out_.reserve(1 << 16);
    out_ += "\x80\x04";
    open_frame();
  }

  ~Pickler() {
    for (PyObject* obj : keep_) {
      Py_DECREF(obj);
    }
  }

  void save(PyObject* obj, int depth) {
    if (depth > kMaxDepth) {
      throw GiveUp();
    }
    save_one(obj, depth + 1);
    // Every point between two saves is an opcode boundary: a frame may end there.
    if (out_.size() - frame_start_ - kFrameHeader >= kFrameTarget) {
      close_frame();
      open_frame();
    }
  }

  PyObject* finish() {
    out_ += '.';
    close_frame();
    return PyBytes_FromStringAndSize(out_.data(), static_cast<Py_ssize_t>(out_.size()));
  }

 private:
  void open_frame() {
    frame_start_ = out_.size();
    out_.append(kFrameHeader, '\0');
  }

  void close_frame() {
    const uint64_t n = out_.size() - frame_start_ - kFrameHeader;
    if (n == 0) {
      out_.resize(frame_start_);
      return;
    }
    out_[frame_start_] = '\x95';
    put_le(frame_start_ + 1, n, 8);
  }

  void put_le(size_t at, uint64_t v, int n) {
    for (int i = 0; i < n; ++i) {
      out_[at + static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
    }
  }

  void append_le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) {
      out_ += static_cast<char>((v >> (8 * i)) & 0xff);
    }
  }

  // Holds a new reference until the end: its address may be a memo key.
  PyObject* hold(PyObject* obj) {
    if (obj == nullptr) {
      throw PythonError();
    }
    keep_.push_back(obj);
    return obj;
  }

  // Memoizes obj unless nothing but its container refers to it (`own_refs` references, ours
  // included): such an object cannot be met again, and leaving it out of the memo changes
  // nothing the stream loads to.
  void memoize(PyObject* obj, Py_ssize_t own_refs = 1) {
    if (Py_REFCNT(obj) <= own_refs) {
      return;
    }
    memo_.insert(obj, next_memo_++);
    out_ += '\x94';  // MEMOIZE
  }

  bool memo_get(PyObject* obj) {
    const uint32_t* index = memo_.find(obj);
    if (index == nullptr) {
      return false;
    }
    if (*index < 256) {
      out_ += 'h';  // BINGET
      out_ += static_cast<char>(*index);
    } else {
      out_ += 'j';  // LONG_BINGET
      append_le(*index, 4);
    }
    return true;
  }

  void save_int(PyObject* obj) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      throw GiveUp();
    }
    if (v >= 0 && v < 256) {
      out_ += 'K';  // BININT1
      out_ += static_cast<char>(v);
    } else if (v >= 0 && v < 65536) {
      out_ += 'M';  // BININT2
      append_le(static_cast<uint64_t>(v), 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      out_ += 'J';  // BININT
      append_le(static_cast<uint64_t>(static_cast<uint32_t>(static_cast<int32_t>(v))), 4);
    } else {
      // LONG1: little-endian two's complement, the fewest bytes that keep the sign.
      int n = 1;
      while (n < 8) {
        const long long lo = -(1LL << (8 * n - 1));
        const long long hi = (1LL << (8 * n - 1)) - 1;
        if (v >= lo && v <= hi) {
          break;
        }
        ++n;
      }
      out_ += '\x8a';
      out_ += static_cast<char>(n);
      append_le(static_cast<uint64_t>(v), n);
    }
  }

  void save_str(PyObject* obj) {
    Py_ssize_t size = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(obj, &size);
    if (utf8 == nullptr) {  // surrogates: pickle writes them with surrogatepass
      PyErr_Clear();
      throw GiveUp();
    }
    if (size < 256) {
      out_ += '\x8c';  // SHORT_BINUNICODE
      out_ += static_cast<char>(size);
    } else if (static_cast<uint64_t>(size) <= UINT32_MAX && static_cast<size_t>(size) < kFrameTarget) {
      out_ += 'X';  // BINUNICODE
      append_le(static_cast<uint64_t>(size), 4);
    } else {
      throw GiveUp();  // pickle writes such strings outside frames
    }
    out_.append(utf8, static_cast<size_t>(size));
    memoize(obj);
  }

  void save_bytes(PyObject* obj) {
    const Py_ssize_t size = PyBytes_GET_SIZE(obj);
    if (size < 256) {
      out_ += 'C';  // SHORT_BINBYTES
      out_ += static_cast<char>(size);
    } else if (static_cast<size_t>(size) < kFrameTarget) {
      out_ += 'B';  // BINBYTES
      append_le(static_cast<uint64_t>(size), 4);
    } else {
      throw GiveUp();
    }
    out_.append(PyBytes_AS_STRING(obj), static_cast<size_t>(size));
    memoize(obj);
  }

  void save_float(PyObject* obj) {
    const double d = PyFloat_AS_DOUBLE(obj);
    uint64_t bits = 0;
    std::memcpy(&bits, &d, sizeof bits);
    out_ += 'G';  // BINFLOAT, big-endian
    for (int i = 7; i >= 0; --i) {
      out_ += static_cast<char>((bits >> (8 * i)) & 0xff);
    }
  }

  // The items of a tuple as pickle's save_tuple writes them; `memo`: memoize the tuple.
  void save_tuple_items(PyObject* obj, int depth, bool memo) {
    const Py_ssize_t n = PyTuple_GET_SIZE(obj);
    if (n == 0) {
      out_ += ')';  // EMPTY_TUPLE (never memoized)
      return;
    }
    if (n > 3) {
      out_ += '(';  // MARK
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      save(PyTuple_GET_ITEM(obj, i), depth);
    }
    if (memo && memo_.find(obj) != nullptr) {
      throw GiveUp();  // reached through itself: pickle's recursive-tuple case
    }
    static const char kTupleN[] = {'\0', '\x85', '\x86', '\x87'};  // TUPLE1..3
    out_ += n > 3 ? 't' : kTupleN[n];
    if (memo) {
      memoize(obj);
    }
  }

  void save_list(PyObject* obj, int depth) {
    out_ += ']';  // EMPTY_LIST
    memoize(obj);
    for (Py_ssize_t start = 0; start < PyList_GET_SIZE(obj); start += kBatch) {
      const Py_ssize_t end = std::min(PyList_GET_SIZE(obj), start + kBatch);
      if (end - start == 1) {
        save(PyList_GET_ITEM(obj, start), depth);
        out_ += 'a';  // APPEND
        continue;
      }
      out_ += '(';
      for (Py_ssize_t i = start; i < end && i < PyList_GET_SIZE(obj); ++i) {
        save(PyList_GET_ITEM(obj, i), depth);
      }
      out_ += 'e';  // APPENDS
    }
  }

  void save_dict(PyObject* obj, int depth, Py_ssize_t own_refs = 1) {
    out_ += '}';  // EMPTY_DICT
    memoize(obj, own_refs);
    const Py_ssize_t size = PyDict_GET_SIZE(obj);
    Py_ssize_t pos = 0, done = 0;
    PyObject *key = nullptr, *value = nullptr;
    while (done < size) {
      const Py_ssize_t batch = std::min(kBatch, size - done);
      if (batch > 1) {
        out_ += '(';
      }
      for (Py_ssize_t i = 0; i < batch; ++i) {
        if (!PyDict_Next(obj, &pos, &key, &value) || PyDict_GET_SIZE(obj) != size) {
          throw GiveUp();  // changed while written
        }
        save(key, depth);
        save(value, depth);
      }
      out_ += batch > 1 ? 'u' : 's';  // SETITEMS / SETITEM
      done += batch;
    }
  }

  // An object pickle writes by name (a class, a dtype, torch.strided): the opcodes pickle
  // writes for it alone, memoized once written.
  void save_global(PyObject* obj) {
    if (memo_get(obj)) {
      return;
    }
    PyObject* entry = PyDict_GetItemWithError(globals_, obj);  // borrowed: (opcodes, obj)
    if (entry == nullptr || PyTuple_GET_ITEM(entry, 1) != obj) {  // equal is not enough
      if (PyErr_Occurred()) {
        PyErr_Clear();
      }
      throw GiveUp();
    }
    PyObject* ops = PyTuple_GET_ITEM(entry, 0);
    out_.append(PyBytes_AS_STRING(ops), static_cast<size_t>(PyBytes_GET_SIZE(ops)));
    memoize(obj);
  }

  // cls.__new__(cls) then BUILD with the state: pickle's copyreg.__newobj__ path. `own_dict`:
  // the state is obj's own __dict__ (referred to by obj and held by us).
  void save_newobj(PyObject* obj, PyObject* state, int depth, bool own_dict = false) {
    save_global(reinterpret_cast<PyObject*>(Py_TYPE(obj)));
    out_ += ")\x81";  // EMPTY_TUPLE, NEWOBJ
    memoize(obj);
    if (state == Py_None) {
      return;
    }
    if (own_dict && PyDict_CheckExact(state) && depth < kMaxDepth) {
      if (!memo_get(state)) {
        save_dict(state, depth + 1, 2);
      }
    } else {
      save(state, depth);
    }
    out_ += 'b';  // BUILD
  }

  void save_object(PyObject* obj, int depth) {
    PyObject* mode_obj = PyDict_GetItemWithError(classes_, reinterpret_cast<PyObject*>(Py_TYPE(obj)));
    if (mode_obj == nullptr) {
      if (PyErr_Occurred()) {
        PyErr_Clear();
      }
      save_global(obj);  // an object pickled by name (dtype, layout, class), or give up
      return;
    }
    switch (PyLong_AsLong(mode_obj)) {
      case kStateDict: {
        PyObject* dict = hold(PyObject_GenericGetDict(obj, nullptr));
        save_newobj(obj, PyDict_Check(dict) && PyDict_GET_SIZE(dict) == 0 ? Py_None : dict, depth, true);
        return;
      }
      case kStateCall: {
        PyObject* state = hold(PyObject_CallMethod(obj, "__getstate__", nullptr));
        save_newobj(obj, state, depth);
        return;
      }
      case kStateByFields: {
        PyObject* dict = hold(PyObject_GenericGetDict(obj, nullptr));
        if (!PyDict_Check(dict)) {
          throw GiveUp();
        }
        std::vector<PyObject*> key{reinterpret_cast<PyObject*>(Py_TYPE(obj))};
        Py_ssize_t pos = 0;
        PyObject *k = nullptr, *v = nullptr;
        while (PyDict_Next(dict, &pos, &k, &v)) {
          key.push_back(k);
          key.push_back(v);
        }
        auto it = states_.find(key);
        if (it == states_.end()) {
          PyObject* state = hold(PyObject_CallMethod(obj, "__getstate__", nullptr));
          Py_INCREF(state);
          hold(state);  // a second reference: memoized, for the next object like it
          it = states_.emplace(key, state).first;
        }
        save_newobj(obj, it->second, depth);
        return;
      }
      case kStateNotNone: {
        PyObject* dict = hold(PyObject_GenericGetDict(obj, nullptr));
        if (!PyDict_Check(dict)) {
          throw GiveUp();
        }
        PyObject* state = dict;
        Py_ssize_t pos = 0;
        PyObject *k = nullptr, *v = nullptr;
        while (PyDict_Next(dict, &pos, &k, &v)) {
          if (v == Py_None) {
            state = nullptr;
            break;
          }
        }
        if (state == nullptr) {  // a copy without the None fields
          state = hold(PyDict_New());
          pos = 0;
          while (PyDict_Next(dict, &pos, &k, &v)) {
            if (v != Py_None && PyDict_SetItem(state, k, v) != 0) {
              throw PythonError();
            }
          }
        }
        save_newobj(obj, state, depth, state == dict);
        return;
      }
      case kTupleReduce: {
        save_global(reinterpret_cast<PyObject*>(Py_TYPE(obj)));
        save_tuple_items(obj, depth, false);  // the tuple of its items ...
        out_ += "\x85R";                      // ... as the one argument: TUPLE1, REDUCE
        memoize(obj);
        return;
      }
      case kReduceCall: {
        PyObject* reduced = hold(PyObject_CallMethod(obj, "__reduce_ex__", "i", 4));
        if (!PyTuple_CheckExact(reduced) || PyTuple_GET_SIZE(reduced) != 2 ||
            !PyTuple_CheckExact(PyTuple_GET_ITEM(reduced, 1))) {
          throw GiveUp();
        }
        save_global(PyTuple_GET_ITEM(reduced, 0));
        save(PyTuple_GET_ITEM(reduced, 1), depth);
        out_ += 'R';
        memoize(obj);
        return;
      }
      default:
        throw GiveUp();
    }
  }

  void save_one(PyObject* obj, int depth) {
    if (obj == Py_None) {
      out_ += 'N';
      return;
    }
    if (obj == Py_True || obj == Py_False) {
      out_ += obj == Py_True ? '\x88' : '\x89';  // NEWTRUE / NEWFALSE
      return;
    }
    PyTypeObject* type = Py_TYPE(obj);
    if (type == &PyLong_Type) {
      save_int(obj);
      return;
    }
    if (type == &PyFloat_Type) {
      save_float(obj);
      return;
    }
    if (memo_get(obj)) {
      return;
    }
    if (type == &PyUnicode_Type) {
      save_str(obj);
    } else if (type == &PyTuple_Type) {
      save_tuple_items(obj, depth, true);
    } else if (type == &PyDict_Type) {
      save_dict(obj, depth);
    } else if (type == &PyList_Type) {
      save_list(obj, depth);
    } else if (type == &PyBytes_Type) {
      save_bytes(obj);
    } else {
      save_object(obj, depth);
    }
  }

  PyObject* globals_;
  PyObject* classes_;
  std::string out_;
  size_t frame_start_ = 0;
  Memo memo_;
  uint32_t next_memo_ = 0;
  std::vector<PyObject*> keep_;
  // kStateByFields: the state of each (type, field names and values) met so far.
  std::map<std::vector<PyObject*>, PyObject*> states_;
};

}  // namespace

PyObject* pickle_tree(PyObject* obj, PyObject* globals, PyObject* classes) {
  if (!PyDict_Check(globals) || !PyDict_Check(classes)) {
    PyErr_SetString(PyExc_TypeError, "pickle_tree: globals and classes must be dicts");
    return nullptr;
  }
  try {
    Pickler pickler(globals, classes);
    pickler.save(obj, 0);
    return pickler.finish();
  } catch (const GiveUp&) {
    Py_RETURN_NONE;
  } catch (const PythonError&) {
    return nullptr;
  }
}

}  // namespace dcp_native
