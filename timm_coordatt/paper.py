""" The papers the models come from, and the published numbers they are compared with, by timm model name
(224x224, ImageNet-1k).

CA paper: `Coordinate Attention for Efficient Mobile Network Design` (Hou, Zhou, Feng, CVPR 2021,
arXiv:2103.02907). MobileNeXt paper: `Rethinking Bottleneck Structure for Efficient Mobile Network
Design` (Zhou, Hou, Chen, Feng, Yan, ECCV 2020, arXiv:2007.02269), for the widths the CA paper leaves out.
"""
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ['Paper', 'PAPERS', 'PaperResult', 'PAPER_RESULTS', 'CA_PAPER', 'MOBILENEXT_PAPER']

CA_PAPER = 'arXiv:2103.02907'
MOBILENEXT_PAPER = 'arXiv:2007.02269'


@dataclass(frozen=True)
class Paper:
    """A paper the models come from, as model cards name and cite it."""
    title: str
    url: str
    bibtex: str


# by the ids of the models' `pretrained_cfg['paper_ids']`
PAPERS: Dict[str, Paper] = {
    CA_PAPER: Paper(
        'Coordinate Attention for Efficient Mobile Network Design', 'https://arxiv.org/abs/2103.02907',
        """\
@inproceedings{hou2021coordinate,
  title={Coordinate Attention for Efficient Mobile Network Design},
  author={Hou, Qibin and Zhou, Daquan and Feng, Jiashi},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={13713--13722},
  year={2021}
}"""),
    MOBILENEXT_PAPER: Paper(
        'Rethinking Bottleneck Structure for Efficient Mobile Network Design', 'https://arxiv.org/abs/2007.02269',
        """\
@inproceedings{zhou2020rethinking,
  title={Rethinking Bottleneck Structure for Efficient Mobile Network Design},
  author={Zhou, Daquan and Hou, Qibin and Chen, Yunpeng and Feng, Jiashi and Yan, Shuicheng},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2020}
}"""),
}


@dataclass(frozen=True)
class PaperResult:
    """Parameters (millions), M-Adds (millions) and top-1 (%) as a paper reports them.

    `approximate`: the values are recalled, not read from the paper (shown with a '~').
    """
    params_m: float
    madds_m: float
    top1: Optional[float]
    source: str
    approximate: bool = False


PAPER_RESULTS: Dict[str, PaperResult] = {
    'mobilenetv2_100': PaperResult(3.5, 300, 72.3, CA_PAPER),
    'mobilenetv2_ca': PaperResult(3.95, 310, 74.3, CA_PAPER),
    'mobilenext_100': PaperResult(3.5, 300, 74.0, CA_PAPER),
    'mobilenext_ca': PaperResult(4.09, 330, 75.2, CA_PAPER),
    'efficientnet_b0': PaperResult(5.3, 390, 77.3, CA_PAPER),
    # the CA paper's EfficientNet-b0 + CA row (its Table 5) could not be read; these values are recalled
    'efficientnet_b0_ca': PaperResult(5.4, 400, 77.8, CA_PAPER, approximate=True),
    # the MobileNeXt paper's width table; its top-1 for these widths is not in this project's reference notes
    'mobilenext_140': PaperResult(6.1, 590, None, MOBILENEXT_PAPER),
    'mobilenext_075': PaperResult(2.5, 210, None, MOBILENEXT_PAPER),
    'mobilenext_050': PaperResult(2.1, 110, None, MOBILENEXT_PAPER),
}
