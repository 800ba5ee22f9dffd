"""RegNetY-400MF: the stage widths from the design parameters."""

from normlab.bench import zoo


def test_regnet_small_stages_are_regnety_400mf():
    # Radosavovic et al. 2020, RegNetY-400MF: widths 48, 104, 208, 440; depths 1, 3, 6, 6
    assert zoo.regnet_stages(16, 48, 27.89, 2.09, 8) == [
        (48, 1, 8),
        (104, 3, 8),
        (208, 6, 8),
        (440, 6, 8),
    ]
