"""`scaler data ...`: preparing datasets (argument parsing stays in cli.py).

    scaler data convert images/ --out shards/ --shards 8     # class subfolders -> labels
    scaler data convert x.npz --out shards/ --key x --label-key y
    scaler train CONFIG data.source=array_record data.path=shards/
"""

from scaler.errors import UserError


def convert(args) -> int:
  from scaler.data.convert import convert as convert_to_shards

  d = convert_to_shards(args.src, args.out, args.shards, args.key, args.label_key)
  classes = f", {d['num_classes']} classes" if d["num_classes"] else ", unlabelled"
  print(f"scaler: {d['num_examples']} examples{classes} -> {len(d['files'])} ArrayRecord "
        f"shards in {args.out}")
  print(f"scaler: train on them with data.source=array_record data.path={args.out}")
  return 0


def data(args) -> int:
  commands = {"convert": convert}
  if args.data_command not in commands:
    raise UserError(f"scaler data {args.data_command}: accepted: {', '.join(commands)}")
  return commands[args.data_command](args)
