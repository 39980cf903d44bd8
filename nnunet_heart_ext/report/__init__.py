"""`nnunet-heart report`: every run's predictions seen before they are uploaded, as one
self-contained static HTML page (`OUT/index.html`) and its numbers (`OUT/report.json`).

    measures.py    per case: volume of each class (ml), myocardium mass, calcification mm3 and
                   voxels >= 130 HU, connected components, distance of calcifications to the valve
    flags.py       the training labels' distribution and the rules that flag a test case against it
    pictures.py    three slices through the heart and a coronal projection, labels overlaid (PNG)
    crossval.py    nnU-Net's validation summaries and training logs, as typed records
    provenance.py  where the data comes from: folders, the extension's commit, models, folds
    content.py     what a report holds (typed records)
    page.py        the HTML page
    build.py       finding the files, the worker pool, writing the outputs (`make_report`)

Computation (measures, flags, pictures) and the page are separate: page.py only formats.
"""
