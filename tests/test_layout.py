"""The house stays layered: each module imports only modules below it, so model.py can be read (and used) alone,
and no import cycle can creep in as features land."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first: a module may import only modules of a lower layer
LAYERS = [
    {"model", "fineweb", "plot_log"},  # nothing of ours
    {"generate", "checkpoint"},  # functions over a model; checkpoint files
    {"training", "export_hf"},  # what both training scripts share; a checkpoint -> a Hugging Face folder
    {"coco", "hellaswag"},  # data and benchmark, each with its own command line
    {"caption_eval", "train_gpt2"},
    {"sample", "train_caption"},
    {"bench"},
]


def our_imports(module):
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):  # imports inside functions count too
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set().union(*LAYERS)


def test_every_module_imports_only_modules_below_it():
    layer_of = {module: i for i, layer in enumerate(LAYERS) for module in layer}
    ours = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    assert ours == set(layer_of), "a new top-level module needs its place in LAYERS"
    upward = [(module, imported) for module in sorted(ours) for imported in sorted(our_imports(module))
              if layer_of[imported] >= layer_of[module]]
    assert upward == []


def test_model_py_is_the_model_alone():
    assert our_imports("model") == set()
