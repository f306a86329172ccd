"""A read of a checkpoint's pickle before `torch.load` runs it, for what the weights-only unpickler lets through.

That unpickler calls only allow-listed functions, but among them are constructors that iterate their argument
(`set`, `OrderedDict`, `Counter`, `bytearray`, and the builtins vqar's OmegaConf entries need). A tensor view with
stride 0 claims any number of elements over a single stored one, so `set(view)` in a 3 MB file builds a billion
tensor objects inside `torch.load`: memory runs out and the kernel kills the process, which neither a timeout nor
Ctrl-C can stop. Such a view as a weight also sets an architecture of billions of rows. Neither occurs in a file
that `torch.save` writes from training, so both are refused here, before anything is built:

* a tensor whose shape holds more elements than its storage;
* one of those constructors called on a tensor, or `bytearray` on a size larger than the file.

The stack is followed symbolically (`pickletools.genops`): integers, strings, tuples, storages and tensors as
values, anything else as an opaque object. Opcodes that the weights-only unpickler refuses are left to it.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
from typing import IO, Any

# Functions that rebuild a tensor from (storage, storage_offset, size, stride, ...).
TENSOR_REBUILDS = {f"torch._utils.{name}" for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                                      "_rebuild_qtensor")}  # fmt: skip
# Allowed constructors that take every item of an iterable argument.
ITERATING = {f"builtins.{name}" for name in ("set", "frozenset", "list", "tuple", "dict", "bytearray")}
ITERATING |= {"collections.OrderedDict", "collections.Counter", "collections.defaultdict"}
INTEGERS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
STRINGS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}


class CraftedPickleError(ValueError):
    """The pickle asks for more memory than the file holds; nothing of it was built."""


class _Global(str):
    """A global the pickle names (module.name)."""


class _Storage(int):
    """A storage, as its number of elements."""


_MARK, _TENSOR, _OBJECT = object(), object(), object()


def check_pickle(stream: IO[bytes], file_bytes: int) -> None:
    """Reads one pickle from `stream` (up to its STOP) and raises CraftedPickleError for what the module docstring
    names. A pickle too damaged to follow is left for the unpickler to refuse."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name == "STOP":
                return
            _step(op, arg, stack, memo, file_bytes)
    except CraftedPickleError:
        raise
    except Exception:  # noqa: BLE001 - damaged: torch.load says so in its own words
        return


def _step(op: pickletools.OpcodeInfo, arg, stack: list, memo: dict, file_bytes: int) -> None:
    name = op.name
    if name in INTEGERS or name in STRINGS:
        stack.append(arg)
    elif name == "MARK":
        stack.append(_MARK)
    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[arg] = stack[-1]
    elif name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo[arg])
    elif name == "GLOBAL":
        module, qualname = arg.split(" ", 1)
        stack.append(_global(module, qualname))
    elif name == "STACK_GLOBAL":
        qualname, module = stack.pop(), stack.pop()
        stack.append(_global(module, qualname))
    elif name == "EMPTY_TUPLE":
        stack.append(())
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        count = int(name[-1])
        items = tuple(stack[-count:])
        del stack[-count:]
        stack.append(items)
    elif name == "TUPLE":
        stack.append(tuple(_pop_to_mark(stack)))
    elif name == "BINPERSID":
        pid = stack.pop()  # ("storage", storage type, key, location, number of elements, ...)
        sized = isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and type(pid[4]) is int
        stack.append(_Storage(pid[4]) if sized else _OBJECT)
    elif name == "REDUCE":
        args, func = stack.pop(), stack.pop()
        stack.append(_call(func, args if isinstance(args, tuple) else (), file_bytes))
    elif name == "NEWOBJ":  # cls.__new__(cls, *args): a Parameter or tensor subclass of a tensor is one too
        args = stack.pop()
        stack[-1] = _TENSOR if _holds_tensor(args) else _OBJECT
    elif name == "BUILD":
        stack.pop()  # the state; the object built keeps what it is
    elif name == "DUP":
        stack.append(stack[-1])  # a copy is what it copies (else a tensor passed on as an opaque object)
    else:  # containers, constants, POP, DUP ...: by the opcode's stack effect, as opaque objects
        before = op.stack_before
        if pickletools.markobject in before:
            _pop_to_mark(stack)
            del stack[len(stack) - before.index(pickletools.markobject) :]
        elif before:
            del stack[-len(before) :]
        stack.extend(_OBJECT for _ in op.stack_after)


def _global(module: str, qualname: str) -> _Global:
    """The name of a global as Python 3 spells it: protocol 2, which torch.save writes, keeps Python 2's module
    names (`__builtin__.set`), which the unpickler maps back."""
    module, qualname = _compat_pickle.NAME_MAPPING.get((module, qualname), (module, qualname))
    return _Global(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{qualname}")


def _pop_to_mark(stack: list) -> list:
    at = len(stack) - 1 - stack[::-1].index(_MARK)
    items = stack[at + 1 :]
    del stack[at:]
    return items


def _holds_tensor(value, depth: int = 0) -> bool:
    """Whether `value` is, or a tuple in it holds, a tensor or storage: what a call on it may return as a tensor."""
    if value is _TENSOR or isinstance(value, _Storage):
        return True
    return isinstance(value, tuple) and depth < 8 and any(_holds_tensor(item, depth + 1) for item in value)


def _call(func, args: tuple, file_bytes: int):
    if func in TENSOR_REBUILDS and len(args) >= 4 and isinstance(args[0], _Storage):
        size = args[2]
        if isinstance(size, tuple) and all(type(n) is int for n in size):
            elements = 1
            for n in size:
                elements *= n
            if elements > args[0]:
                raise CraftedPickleError(f"a tensor of shape {'x'.join(map(str, size))} ({elements:,} elements) is a "
                                         f"view of a storage of {int(args[0]):,}: a file saved from training holds no "
                                         "such tensor")  # fmt: skip
        return _TENSOR
    if func in ITERATING:
        if any(arg is _TENSOR or isinstance(arg, _Storage) for arg in args):
            raise CraftedPickleError(f"it calls {func.rsplit('.', 1)[1]}() on a tensor, which builds one object per "
                                     "element: a file saved from training does not")  # fmt: skip
        if func == "builtins.bytearray" and args and type(args[0]) is int and args[0] > file_bytes:
            raise CraftedPickleError(f"it asks for a bytearray of {args[0]:,} bytes, more than the file holds")
        return _OBJECT
    # any other call on a tensor (a Parameter, a tensor subclass rebuilt) may return one
    return _TENSOR if _holds_tensor(args) else _OBJECT
