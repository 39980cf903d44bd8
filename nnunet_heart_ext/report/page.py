"""The report as one self-contained static HTML page: no script, no network, pictures inlined as
PNG data, the training curves as inline SVG. Opens from disk in any browser and can be kept beside
a submission as a single file.

Made from a `content.Report` alone (numbers are formatted here, never computed).
"""
import base64
import html
from typing import Iterable, List, Optional, Sequence, Tuple

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.report.content import Picture, Report, TestCase
from nnunet_heart_ext.report.crossval import Curve, FoldResult, mean, number
from nnunet_heart_ext.report.flags import rule_texts
from nnunet_heart_ext.report.measures import (CALCIUM, CALCIUM_HU, CONNECTIVITY, MYOCARDIUM,
                                              MYOCARDIUM_DENSITY_G_PER_ML, VALVE)
from nnunet_heart_ext.report.pictures import COLOURS, HEART_FOV_MM, PANEL_NAMES

TEST_TABLE_ID = "test-cases"   # the test set's table: one row (class "case") per test case
FOLD_COLOURS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em 2em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ccc} .sub{color:#555}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:middle}
th{background:#f3f3f3;position:sticky;top:0} td.l,th.l{text-align:left}
tr.flagged td.case{border-left:4px solid #d55e00} .flag{display:inline-block;background:#fde2d6;color:#8a2b00;
border-radius:3px;padding:1px 5px;margin:1px;font-size:12px;text-align:left} .ok{color:#2a7a2a}
.swatch{display:inline-block;width:.9em;height:.9em;vertical-align:middle;margin:0 .3em 0 .8em;border-radius:2px}
img{display:block;image-rendering:auto} dl.prov dt{font-weight:600;float:left;clear:left;width:13em}
dl.prov dd{margin-left:14em;overflow-wrap:anywhere} .muted{color:#777} figure{margin:.6em 0}
figcaption{font-size:13px;color:#444} td.flags,th.flags{min-width:15em;max-width:22em}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _f(value: Optional[float], digits: int = 2) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def img(picture: Picture, alt: str) -> str:
    data = base64.b64encode(picture.png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" width="{picture.width}" height="{picture.height}" alt="{_e(alt)}">'


def _name(label: int) -> str:
    return ds.CLASSES[label].replace("_", " ")


def legend() -> str:
    return "".join(f'<span class="swatch" style="background:rgb{COLOURS[k]}"></span>{_e(_name(k))}'
                   for k in ds.CLASSES)


def _table(head: Sequence[str], rows: Iterable[str], table_id: str = "", above: str = "") -> str:
    """A table; `above`: a first header row (cells of its own)."""
    ident = f' id="{table_id}"' if table_id else ""
    above = f"<tr>{above}</tr>" if above else ""
    return (f"<table{ident}><thead>{above}<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


# ----------------------------------------------------------------------------- test set
def _test_row(t: TestCase) -> str:
    m = t.measures
    myo, valve, calcium = m.of(MYOCARDIUM), m.of(VALVE), m.of(CALCIUM)
    flags = "".join(f'<span class="flag" title="rule: {_e(f.rule)}">{_e(f.text)}</span>' for f in t.flags) or \
        '<span class="ok">none</span>'
    distance = _f(m.calcium_valve_mm[0], 1) if m.calcium_valve_mm else "&ndash;"
    cells = [f'<td class="l case">{_e(t.case)}</td>', f'<td class="l flags">{flags}</td>',
             f"<td>{_f(myo.volume_ml)}</td>", f"<td>{_f(m.myocardium_mass_g)}</td>", f"<td>{myo.components}</td>",
             f"<td>{_f(valve.volume_ml, 3)}</td>", f"<td>{valve.components}</td>",
             f"<td>{_f(m.calcium_mm3, 1)}</td>",
             f"<td>{'&ndash;' if m.calcium_voxels_at_threshold is None else m.calcium_voxels_at_threshold}</td>",
             f"<td>{calcium.components}</td>", f"<td>{distance}</td>",
             f"<td>{img(t.picture, f'{t.case}: ' + ', '.join(PANEL_NAMES))}</td>"]
    return f'<tr class="case{" flagged" if t.flags else ""}" data-case="{_e(t.case)}">' + "".join(cells) + "</tr>"


def test_section(r: Report) -> str:
    tests = r.sorted_tests()
    flagged = sum(1 for t in tests if t.flags)
    above = ("<th rowspan='2' class='l'>case</th><th rowspan='2' class='l flags'>flags</th>"
             "<th colspan='3'>myocardium</th><th colspan='2'>aortic valve</th><th colspan='4'>calcification</th>"
             f"<th rowspan='2' class='l'>pictures: {', '.join(PANEL_NAMES)}</th>")
    head = ["ml", f"g<br><span class='muted'>{MYOCARDIUM_DENSITY_G_PER_ML} g/ml</span>", "comp.", "ml", "comp.",
            "mm&sup3;", f"&ge;&nbsp;{CALCIUM_HU}&nbsp;HU voxels", "comp.", "to valve mm<br>"
            "<span class='muted'>farthest</span>"]
    rules = "".join(f"<li><b>{_e(rule)}</b>: {_e(text)}</li>" for rule, text in rule_texts(r.distribution))
    return (f"<h2 id='test'>Test set: {len(tests)} case(s), {flagged} flagged</h2>"
            f"<p class='sub'>Sorted by flags, then case. Components: {CONNECTIVITY}-connected voxels. Pictures: "
            f"{', '.join(PANEL_NAMES[:3])} slices through the myocardium's centre of mass ({HEART_FOV_MM:g} mm "
            f"around it), and the {PANEL_NAMES[3]} of the whole volume (the CT's maximum intensity with each "
            f"class projected over it: where the calcifications are). {legend()}</p>"
            + _table(head, (_test_row(t) for t in tests), TEST_TABLE_ID, above)
            + f"<h3>What is flagged</h3><ul>{rules}</ul>" + training_section(r))


def training_section(r: Report) -> str:
    d = r.distribution
    if not d.cases:
        return "<p class='muted'>No training labels given: the flags that compare with them are not judged.</p>"
    rows = [f"<tr><td class='l'>{_e(_name(c.label))}</td><td>{c.cases_with} of {d.cases}</td>"
            f"<td>{_f(c.min_ml, 3)}</td><td>{_f(c.median_ml, 3)}</td><td>{_f(c.max_ml, 3)}</td>"
            f"<td>{c.max_components}</td></tr>" for c in d.classes]
    far = "&ndash;" if d.calcium_valve_max_mm is None else f"{d.calcium_valve_max_mm:.1f} mm"
    return (f"<h3>Training labels ({d.cases})</h3>"
            + _table(["class", "cases holding it", "min ml", "median ml", "max ml", "most components"], rows)
            + f"<p class='sub'>Farthest training calcification from its valve: {far}.</p>")


# ----------------------------------------------------------------------------- test score (demo)
def _dice_cells(values: Sequence[Optional[float]]) -> str:
    return "".join(f"<td>{_f(v, 4)}</td>" for v in values) + f"<td>{_f(mean(values), 4)}</td>"


def score_section(r: Report) -> str:
    s = r.test_score
    if s is None:
        return ""
    head = ["case"] + [_e(_name(k)) for k in ds.CLASSES] + ["mean"]
    rows = [f"<tr><td class='l'>mean</td>{_dice_cells(s.mean_dice)}</tr>"] + \
        [f"<tr><td class='l'>{_e(c.case)}</td>{_dice_cells(c.dice)}</tr>" for c in s.cases]
    return (f"<h2 id='score'>Test Dice against the ground truth</h2><p class='sub'>{_e(s.path)}</p>"
            + _table(head, rows))


# ----------------------------------------------------------------------------- decision (offsets, gate)
def decision_section(r: Report) -> str:
    """The decision offsets and has-calcium gate chosen on the cross-validation, and each fold's
    validation Dice with nnU-Net's argmax and with them (heart_decision.json's own numbers)."""
    d = r.decision
    if d is None:
        return ""
    head = ["fold", "decision"] + [_e(_name(k)) for k in ds.CLASSES] + ["mean"]
    names = {"nnunet": "argmax (nnU-Net)", "with_decision": "offsets and gate"}
    rows = [f"<tr><td>{_e(fold)}</td><td class='l'>{names[key]}</td>{_dice_cells([number(v) for v in values])}</tr>"
            for fold, key, values in d.fold_rows()]
    return (f"<h3 id='decision'>Decision offsets and has-calcium gate</h3><p class='sub'>{_e(d.describe())}; "
            f"mean foreground Dice over the folds {_f(number(d.dice_without), 4)} with nnU-Net's argmax, "
            f"{_f(number(d.dice_with), 4)} with the decision ({_e(r.decision_path)})</p>" + _table(head, rows)
            + _postprocessing_line(d.postprocessing))


def _postprocessing_line(pp) -> str:
    """The postprocessing chosen with the decision (heart_postprocessing.pkl), in one line."""
    if pp is None:
        return ""
    return (f"<p class='sub'>Postprocessing chosen with it: {_e(pp.describe())} (the myocardium's mean validation "
            f"Dice {_f(number(pp.dice_without), 4)} without, {_f(number(pp.dice_with), 4)} with); keep-largest never "
            f"removes the aortic valve or the calcification. nnU-Net's postprocessing.pkl: "
            f"{_e(pp.nnunet_chose or 'not found')}</p>")


# ----------------------------------------------------------------------------- cross-validation
def _polyline(xs, ys, x_of, y_of, colour, dash="") -> str:
    points, out = [], []
    for x, y in zip(xs, ys):
        if y is None:
            if len(points) > 1:
                out.append(points)
            points = []
            continue
        points.append(f"{x_of(x):.1f},{y_of(y):.1f}")
    if len(points) > 0:
        out.append(points)
    dash = f' stroke-dasharray="{dash}"' if dash else ""
    return "".join(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{" ".join(p)}"/>'
                   if len(p) > 1 else f'<circle cx="{p[0].split(",")[0]}" cy="{p[0].split(",")[1]}" r="2" '
                   f'fill="{colour}"/>' for p in out)


def _plot(title: str, series: List[Tuple[str, Curve, str, str]], attribute_pairs, x0: float, width: float,
          height: float) -> str:
    """One panel of the curves figure: each (label, curve, colour) with its attributes drawn."""
    values = [v for _, c, _, _ in series for a, _ in attribute_pairs for v in getattr(c, a) if v is not None]
    epochs = [e for _, c, _, _ in series for e in c.epochs]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi == lo:
        hi, lo = hi + 0.5, lo - 0.5
    e_lo, e_hi = min(epochs), max(max(epochs), min(epochs) + 1)
    left, top, right, bottom = x0 + 48, 24, x0 + width - 8, height - 28
    x_of = lambda e: left + (e - e_lo) / (e_hi - e_lo) * (right - left)  # noqa: E731
    y_of = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    parts = [f'<text x="{x0 + width / 2}" y="14" text-anchor="middle" font-size="13">{_e(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/>']
    for v in (lo, (lo + hi) / 2, hi):
        parts.append(f'<text x="{left - 4}" y="{y_of(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.3g}</text>')
    for e in (e_lo, e_hi):
        parts.append(f'<text x="{x_of(e):.1f}" y="{bottom + 14}" text-anchor="middle" font-size="11">{e}</text>')
    parts.append(f'<text x="{(left + right) / 2}" y="{bottom + 25}" text-anchor="middle" font-size="11">epoch</text>')
    for _, curve, colour, _ in series:
        for attribute, dash in attribute_pairs:
            parts.append(_polyline(curve.epochs, getattr(curve, attribute), x_of, y_of, colour, dash))
    return "".join(parts)


def curves_figure(folds: Sequence[FoldResult]) -> str:
    """Every fold's training curves in one figure (inline SVG): losses, and nnU-Net's pseudo Dice."""
    series = [(f"{f.model} fold {f.fold}", f.curve, FOLD_COLOURS[i % len(FOLD_COLOURS)], "")
              for i, f in enumerate(x for x in folds if x.curve is not None)]
    if not series:
        return "<p class='muted'>No training log found in the fold folders (training_log_*.txt).</p>"
    width, height = 460, 260
    body = _plot("loss (train solid, validation dashed)", series, [("train_loss", ""), ("val_loss", "5,3")], 0,
                 width, height) + _plot("pseudo Dice, mean of the classes (raw dotted, EMA solid)", series,
                                        [("pseudo_dice", "2,3"), ("ema_pseudo_dice", "")], width, width, height)
    keys = "".join(f'<span class="swatch" style="background:{colour}"></span>{_e(label)}'
                   for label, _, colour, _ in series)
    return (f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height}" '
            f'viewBox="0 0 {2 * width} {height}" role="img" aria-label="training curves">{body}</svg>'
            f"<figcaption>{keys}</figcaption></figure>")


def crossval_section(r: Report) -> str:
    if not r.folds:
        return ("<h2 id='cv'>Cross-validation</h2><p class='muted'>No model folder given "
                "(<code>--model</code>).</p>")
    classes = [_e(_name(k)) for k in ds.CLASSES]
    rows = []
    for f in r.folds:
        c = f.curve
        validated = _dice_cells(f.mean_dice) if f.summary else \
            f"<td class='l muted' colspan='{len(ds.CLASSES) + 1}'>not validated (no summary.json)</td>"
        rows.append(f"<tr><td class='l'>{_e(f.model)}</td><td>{f.fold}</td><td>{len(f.cases)}</td>{validated}"
                    f"<td>{len(c.epochs) if c else '&ndash;'}</td>"
                    f"<td>{_f(c.epochs_per_hour, 1) if c else '&ndash;'}</td></tr>")
    folds = _table(["model", "fold", "cases"] + classes + ["mean", "epochs", "epochs / hour"], rows)
    case_rows = [f"<tr><td class='l'>{_e(c.model)}</td><td>{c.fold}</td><td class='l'>{_e(c.case)}</td>"
                 f"{_dice_cells(c.dice)}</tr>" for f in r.folds for c in f.cases]
    per_case = _table(["model", "fold", "case"] + classes + ["mean"], case_rows)
    worst = []
    for w in r.worst:
        caption = (f"{_e(w.dice.case)} ({_e(w.dice.model)} fold {w.dice.fold}): Dice "
                   + ", ".join(f"{_e(_name(k))} {_f(v, 3)}" for k, v in zip(ds.CLASSES, w.dice.dice))
                   + f"; mean {_f(w.dice.mean, 3)}. Reference above, prediction below.")
        picture = img(w.picture, f"{w.dice.case}: reference above, prediction below") if w.picture else \
            f"<p class='muted'>{_e(w.note)}</p>"
        worst.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    return ("<h2 id='cv'>Cross-validation</h2><p class='sub'>Dice from each fold's validation/summary.json "
            "(nnU-Net's; &ndash;: the class is in neither reference nor prediction).</p>" + folds
            + decision_section(r) + "<h3>Training curves</h3>" + curves_figure(r.folds)
            + f"<h3>Worst validation cases</h3><p class='sub'>{legend()}</p>" + ("".join(worst) or
                                                                                 "<p class='muted'>none</p>")
            + f"<details><summary>Dice of every validation case ({len(case_rows)})</summary>{per_case}</details>")


# ----------------------------------------------------------------------------- provenance and page
def provenance_section(r: Report) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in r.provenance.rows())
    return f"<h2 id='provenance'>Where this comes from</h2><dl class='prov'>{rows}</dl>"


def render(r: Report) -> str:
    """The whole page."""
    tests = r.sorted_tests()
    flagged = sum(1 for t in tests if t.flags)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            # no network: nothing is fetched, not even a favicon
            "<link rel='icon' href='data:,'>"
            f"<title>nnunet-heart report: {len(tests)} test cases, {flagged} flagged</title>"
            f"<style>{CSS}</style></head><body>"
            f"<h1>nnunet-heart report</h1><p class='sub'>{len(tests)} test case(s), {flagged} flagged; "
            f"{len(r.folds)} cross-validation fold(s); made {_e(r.provenance.created)} in {r.seconds:.1f} s. "
            "<a href='#test'>test set</a> &middot; <a href='#cv'>cross-validation</a> &middot; "
            "<a href='#provenance'>where this comes from</a></p>"
            + test_section(r) + score_section(r) + crossval_section(r) + provenance_section(r)
            + "</body></html>\n")
