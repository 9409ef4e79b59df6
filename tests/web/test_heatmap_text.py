"""The heat map's text alternative says which class the map shows (WCAG 1.1.1)."""

from __future__ import annotations

import pytest
from fastapi.templating import Jinja2Templates

from dicom_node.settings import Settings
from dicom_node.web import templating

pytestmark = pytest.mark.unit


def _alt(label: str, top_class: str) -> str:
    folder = templating.__file__.rsplit("/", 1)[0] + "/templates"
    templates = templating.configure_templates(Jinja2Templates(directory=folder), Settings())
    macro = '{% from "_macros.html" import heatmap_alt %}{{ heatmap_alt(label, top_class, "the left lung") }}'
    return " ".join(templates.env.from_string(macro).render(label=label, top_class=top_class).split())


def test_the_heat_map_of_an_indeterminate_finding_is_said_to_show_its_most_likely_class() -> None:
    """The map is the top class's: "where the image weighed most in the finding Indeterminate" described
    a map that no class "indeterminate" has (review); the heat-map Secondary Capture names the class."""
    assert _alt("indeterminate", "pneumonia") == (
        "Heat map over the radiograph: where the image weighed most towards Pneumonia, the most likely class "
        "of the finding Indeterminate (red most, then yellow, blue least); strongest in the left lung"
    )
    assert _alt("covid", "covid") == (
        "Heat map over the radiograph: where the image weighed most in the finding COVID-19 (red most, then "
        "yellow, blue least); strongest in the left lung"
    )
