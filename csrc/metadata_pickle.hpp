// A pickler for DCP's checkpoint metadata (dcp_native/_metadata_pickle.py says
// what it writes and when). Python C API only; the GIL must be held.
#pragma once

#include <Python.h>

namespace dcp_native {

// Modes of the classes table (values of `classes`).
enum PickleMode : long {
  kStateDict = 0,   // copyreg.__newobj__(cls) then BUILD with the instance __dict__ (if not empty)
  kStateCall = 1,   // as kStateDict, with obj.__getstate__() as the state
  kTupleReduce = 2, // a tuple subclass reduced to cls(tuple(obj)) (torch.Size)
  kReduceCall = 3,  // obj.__reduce_ex__(4) == (callable, args): callable(*args) (pathlib paths)
  kStateByFields = 4,  // as kStateCall, the state computed once per distinct field values (by
                       // identity): for a __getstate__ that is a function of the fields alone
  kStateNotNone = 5,   // as kStateDict, without the fields whose value is None
};

// The protocol-4 pickle of `obj` (new reference to bytes), or a new reference
// to None when the tree holds anything outside what this pickler writes: then
// the caller uses pickle.dumps. nullptr with a Python error set when a
// __getstate__ / __reduce_ex__ call raises.
//
// `globals`: {object: (opcodes, object)}, the objects pickle writes by name (classes,
// dtypes, layouts, memory formats) and the opcodes it writes for each alone, without
// MEMOIZE; a lookup must find the object itself. `classes`: {type: mode}.
PyObject* pickle_tree(PyObject* obj, PyObject* globals, PyObject* classes);

}  // namespace dcp_native
