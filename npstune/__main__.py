from npstune.cli import main

main()
