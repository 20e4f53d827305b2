"""The test suite: python -m pytest -q -rs test_all.py (the README's and CI's command) runs every test once.

The tests live in tests/, one file per topic (docs/testing.md); the shared fixtures and helpers in conftest.py.
This file collects them all: each module in TOPICS is imported and its tests and fixtures are brought in here, so
pytest collects each test once, as test_all.py::<name>. Add a new tests/test_<topic>.py to TOPICS.

Each test compares against something independent of the code under test: a float64
recomputation written plainly here, HF PEFT / transformers where installed, numpy.
"""
import glob
import importlib
import os

TOPICS = ["lora", "genlora", "lrlora", "aurora", "ranlora", "adapters", "train", "llama", "checkpoints", "tokenizers",
          "bench", "plots", "export", "study", "fused", "copy", "commonsense"]  # in this order: the adapters' quick tests first

_here = os.path.dirname(os.path.abspath(__file__))
_files = {os.path.basename(f)[len("test_"):-len(".py")] for f in glob.glob(os.path.join(_here, "tests", "test_*.py"))}
if _files - set(TOPICS):  # a topic file left out of TOPICS would silently not run
    raise RuntimeError(f"tests/test_{sorted(_files - set(TOPICS))[0]}.py is not in test_all.py's TOPICS")

_from = {}  # test name -> the topic that defines it: a name defined twice would silently run only one of the two
for _topic in TOPICS:
    _module = importlib.import_module(f"tests.test_{_topic}")
    for _name, _obj in vars(_module).items():
        if _name == "pytestmark":
            raise RuntimeError(f"tests/test_{_topic}.py: a module-level pytestmark would not reach test_all.py; mark the tests")
        if _name.startswith("test") and callable(_obj):
            if _name in _from:
                raise RuntimeError(f"{_name} is defined in tests/test_{_from[_name]}.py and tests/test_{_topic}.py")
            _from[_name] = _topic
            globals()[_name] = _obj
        elif not _name.startswith("_") and _name not in globals():
            globals()[_name] = _obj  # the module's fixtures (and, harmlessly, its helpers)
