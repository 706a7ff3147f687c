from finetune_hub_double.server import main

main()
