"""`nnunet-heart`: the extension's command line (phantom, prepare, export, report, pipeline).

    nnunet-heart phantom  --out DIR [--train 8] [--test 4] [--seed 0] [--full-size]
    nnunet-heart prepare  --src DIR [--test-dir DIR] [--link] [--raw DIR] [--dataset Dataset100_Heart]
    nnunet-heart export   --pred DIR --images DIR --out predict.zip
    nnunet-heart report   --pred predict.zip|DIR --images DIR --out DIR [--train-labels DIR] [--model DIR ...]
    nnunet-heart predict-ensemble -i DIR -o DIR -m MODEL_FOLDER [MODEL_FOLDER ...] [-f 0 1 2 3 4] [--decision F]
                                  [-npp N] [--inference_batch N]
    nnunet-heart decision -m MODEL_FOLDER [MODEL_FOLDER ...] [-f 0 1 2 3 4] [-o DIR]
    nnunet-heart pipeline --src DIR | --demo [options]   (what ensemble_pipeline.sh runs; --help)

Invalid input is reported one problem per line, each naming its file, with exit status 1 and
nothing written; a full disk or a denied write, in one line naming the path, the operation and the
free space, with exit status 1 and the previous outputs intact. The subcommands' modules are imported only when run (no torch at all).
"""
import argparse
import sys

from nnunet_heart_ext.data.dataset import DATASET_NAME
from nnunet_heart_ext.pipeline.options import Device


def _phantom(args):
    from nnunet_heart_ext.data.phantom import make_phantom
    make_phantom(args.out, n_train=args.train, n_test=args.test, seed=args.seed, full_size=args.full_size)


def _prepare(args):
    from nnunet_heart_ext.data.prepare import prepare
    prepare(args.src, raw_root=args.raw, dataset_name=args.dataset, test_dir=args.test_dir, link=args.link)


def _export(args):
    from nnunet_heart_ext.data.export import export
    export(args.pred, args.images, args.out)


def _report(args):
    from nnunet_heart_ext.report.build import Inputs, make_report
    make_report(Inputs(predictions=args.pred, images=args.images, out=args.out, train_labels=args.train_labels,
                       train_images=args.train_images or (), models=args.model or (), folds=args.folds,
                       postprocessing=args.postprocessing, test_summary=args.test_summary, decision=args.decision,
                       worst=args.worst,
                       processes=args.np, argv=sys.argv))


def _predict_ensemble(args):
    from nnunet_heart_ext.nnunet.ensemble_predict import predict_ensemble
    from nnunet_heart_ext.nnunet.prefetch import PreprocessingError
    folds = [f if f == "all" else int(f) for f in args.f]
    try:
        predict_ensemble(args.m, args.i, args.o, folds=folds, checkpoint=args.chk, device=args.device,
                         use_mirroring=not args.disable_tta, num_parts=args.num_parts, part_id=args.part_id,
                         overwrite=not args.continue_prediction, decision_file=args.decision,
                         num_processes_preprocessing=args.npp, inference_batch=args.inference_batch)
    # bad arguments or model folders, a case that cannot be preprocessed: the message names them
    except (ValueError, FileNotFoundError, PreprocessingError) as e:
        print(f"nnunet-heart predict-ensemble: error: {e}", file=sys.stderr)
        raise SystemExit(1)


def _decision(args):
    from pathlib import Path

    from nnunet_heart_ext.nnunet.decision import choose

    folds = [f if f == "all" else int(f) for f in args.f]
    gt = args.gt
    if gt is None:
        from nnunetv2.paths import nnUNet_preprocessed

        if not nnUNet_preprocessed:
            print("nnunet-heart decision: error: $nnUNet_preprocessed is not set; name the references with --gt",
                  file=sys.stderr)
            raise SystemExit(1)
        gt = Path(nnUNet_preprocessed) / Path(args.m[0]).resolve().parent.name / "gt_segmentations"
    try:
        choose(args.m, folds, Path(gt), Path(args.o) if args.o else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"nnunet-heart decision: error: {e}", file=sys.stderr)
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-heart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{phantom,prepare,export,report,predict-ensemble,decision,pipeline}")

    p = sub.add_parser("phantom", help="write a synthetic heart CT dataset in the organizer's layout")
    p.add_argument("--out", required=True, help="folder to create (new, empty, or an earlier phantom)")
    p.add_argument("--train", type=int, default=8, help="training cases (patient0001...; default 8)")
    p.add_argument("--test", type=int, default=4, help="test cases, numbered after the training ones (default 4)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same files (default 0)")
    p.add_argument("--full-size", action="store_true", help="512 x 512 x ~300 cases like the real data "
                                                            "(default: small cases for CPU training)")
    p.set_defaults(run=_phantom)

    p = sub.add_parser("prepare", help="organizer layout -> $nnUNet_raw/Dataset100_Heart (checked first)")
    p.add_argument("--src", required=True, help="folder holding training_image1..3/, training_label/ "
                                                "and usually testing_image/")
    p.add_argument("--test-dir", help="test images folder if it is not beside the training folders")
    p.add_argument("--link", action="store_true", help="symbolic links instead of copies")
    p.add_argument("--raw", help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--dataset", default=DATASET_NAME, help=f"dataset folder name (default {DATASET_NAME})")
    p.set_defaults(run=_prepare)

    p = sub.add_parser("export", help="nnU-Net predictions -> flat predict.zip of patientNNNN_predict.nii.gz")
    p.add_argument("--pred", required=True, help="nnUNetv2_predict output folder")
    p.add_argument("--images", required=True, help="the test images predicted (imagesTs or testing_image)")
    p.add_argument("--out", required=True, help="zip to write, e.g. predict.zip")
    p.set_defaults(run=_export)

    p = sub.add_parser("predict-ensemble", help="several models' ensemble of a test folder in one process: "
                                                "nnUNetv2_predict --save_probabilities + nnUNetv2_ensemble without "
                                                "the .npz files")
    p.add_argument("-i", required=True, help="input folder (CASE_0000.nii.gz, as for nnUNetv2_predict)")
    p.add_argument("-o", required=True, help="output folder for the ensemble's label maps")
    p.add_argument("-m", nargs="+", required=True, help="trained model folders (TRAINER__PLANS__CONFIGURATION)")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds of every model (default 0-4)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-device", default=Device.CUDA.value, choices=[d.value for d in Device],
                   help="cuda (default) or cpu: what the pipeline's --device takes")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring")
    p.add_argument("-num_parts", type=int, default=1, help="split the cases into this many parts")
    p.add_argument("-part_id", type=int, default=0, help="the part this process predicts (0-based)")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases already written")
    p.add_argument("--decision", help="heart_decision.json chosen on the ensemble's validation (nnunet-heart "
                                      "decision): its offsets and gate decide the labels (default: argmax)")
    p.add_argument("-npp", type=int, help="processes preprocessing the next cases while one is predicted; 0: "
                                          "each case in this process, before its prediction (default: nnU-Net's "
                                          "default_num_processes, 8 or $nnUNet_def_n_proc, at most the usable cores)")
    p.add_argument("--inference_batch", type=int, help="most network inputs (windows x mirrorings) in one forward "
                                                       "pass of HeartTrainer models (default: the predictor's own, "
                                                       "nnunet_heart_ext/nnunet/predictor.py)")
    p.set_defaults(run=_predict_ensemble)

    p = sub.add_parser("decision", help="choose per-class decision offsets and a has-calcium gate on the "
                                        "cross-validation (written beside postprocessing.pkl)")
    p.add_argument("-m", nargs="+", required=True, help="trained model folder(s) (several: their ensemble)")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0-4)")
    p.add_argument("-o", help="folder to write heart_decision.json to (default: the single model's "
                              "crossval_results_folds_F.. folder, beside nnU-Net's postprocessing.pkl)")
    p.add_argument("--gt", help="reference segmentations (default: $nnUNet_preprocessed/DATASET/gt_segmentations)")
    p.set_defaults(run=_decision)

    p = sub.add_parser("report", help="a self-contained HTML page of the test predictions (volumes, mass, calcium, "
                                      "components, pictures, flags against the training labels) and of the "
                                      "cross-validation (Dice, worst cases, training curves): OUT/index.html, "
                                      "OUT/report.json")
    p.add_argument("--pred", required=True, help="the test predictions: a folder (CASE.nii.gz or CASE_predict.nii.gz) "
                                                 "or predict.zip")
    p.add_argument("--images", required=True, help="the test images (imagesTs or testing_image)")
    p.add_argument("--out", required=True, help="the report's folder (index.html, report.json)")
    p.add_argument("--train-labels", help="training labels (labelsTr or training_label): what the cases are "
                                          "flagged against")
    p.add_argument("--train-images", nargs="+", help="training image folder(s) (imagesTr, or training_image1..3): "
                                                     "the CT under the worst validation cases' pictures")
    p.add_argument("--model", nargs="+", help="trained model folder(s) TRAINER__PLANS__CONFIGURATION: the "
                                              "cross-validation section")
    p.add_argument("--folds", nargs="+", type=int, help="folds of every model (default: every fold_N there)")
    p.add_argument("--postprocessing", help="the postprocessing.pkl applied (named on the page)")
    p.add_argument("--test-summary", help="a summary.json of the test predictions against a ground truth "
                                          "(the demo's test_dice.json)")
    p.add_argument("--decision", help="heart_decision.json (nnunet-heart decision): the offsets and gate applied, "
                                      "and each fold's validation Dice with and without them")
    p.add_argument("--worst", type=int, default=3, help="worst validation cases shown per fold (default 3)")
    p.add_argument("-np", type=int, help="worker processes (default: every usable core)")
    p.set_defaults(run=_report)

    sub.add_parser("pipeline", help="organizer files -> predict.zip with the official commands, here or on "
                                    "Slurm (what ensemble_pipeline.sh runs; `nnunet-heart pipeline --help`)",
                   add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pipeline"]:  # its own options (and --help): nnunet_heart_ext.pipeline.options
        from nnunet_heart_ext.pipeline import main as pipeline_main
        return pipeline_main(argv[1:])
    args = build_parser().parse_args(argv)
    from nnunet_heart_ext.data.files import WriteError
    from nnunet_heart_ext.data.io import DatasetError
    try:
        args.run(args)
    except DatasetError as e:
        print(f"nnunet-heart {args.command}: error: {e}", file=sys.stderr)
        return 1
    except WriteError as e:  # a full disk or a denied write: one line, the previous outputs as they were
        print(f"nnunet-heart {args.command}: error: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
