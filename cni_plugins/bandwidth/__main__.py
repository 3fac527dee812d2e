from cni_plugins.bandwidth import main

main()
