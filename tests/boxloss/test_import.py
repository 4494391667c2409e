import subprocess
import sys


def test_boxloss_imports_with_torch_only():
    """boxloss and its subpackages import without torchvision, mmengine, matplotlib or sklearn: it depends on torch only."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torchvision', 'mmengine', 'matplotlib', 'pycocotools', 'sklearn'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import boxloss, boxloss.recog, boxloss.simulation, boxloss.nms\n"
        "print(len(boxloss.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 20
