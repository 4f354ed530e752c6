"""The type stubs of the C extension (python/lmdecode/_core.pyi) describe what it holds: every
public function and class, with each class's methods and properties, and nothing more."""
import ast
import pathlib

from lmdecode import _core

STUBS = pathlib.Path(__file__).resolve().parents[1] / "python" / "lmdecode" / "_core.pyi"


def stubbed():
    """{name: None for a function or constant, set of member names for a class} from the stub file."""
    names = {}
    for node in ast.parse(STUBS.read_text()).body:
        if isinstance(node, ast.AnnAssign):  # a constant
            names[node.target.id] = None
        elif isinstance(node, ast.FunctionDef):
            names[node.name] = None
        elif isinstance(node, ast.ClassDef):
            names[node.name] = {m.name for m in node.body if isinstance(m, ast.FunctionDef) and m.name != "__init__"}
    return names


def test_stubs_name_every_public_function_and_class_of_the_extension():
    public = {name for name in dir(_core) if not name.startswith("_")}
    assert set(stubbed()) == public


def test_stubbed_classes_have_exactly_their_members():
    for name, members in stubbed().items():
        if members is None:
            assert callable(getattr(_core, name)) or isinstance(getattr(_core, name), int), name
            continue
        cls = getattr(_core, name)
        public = {m for m in vars(cls) if not m.startswith("_")}
        assert members == public, name
