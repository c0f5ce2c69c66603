/*
 * gcm_seal: AEAD_AES_256_GCM encryption as WeChat Pay does it, for tests
 * (openssl enc cannot do GCM).
 *
 *   gcm_seal KEY NONCE ASSOCIATED_DATA < plaintext   prints base64(ct || tag)
 *
 * KEY is the 32-character APIv3 key, used as its bytes; NONCE and
 * ASSOCIATED_DATA are used as their bytes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

int
main(int argc, char **argv)
{
	static unsigned char in[1 << 20];
	static unsigned char out[(1 << 20) + 16];
	static unsigned char b64[((1 << 20) + 16) / 3 * 4 + 8];
	EVP_CIPHER_CTX *ctx;
	size_t		inlen;
	int			len,
				fin;

	if (argc != 4 || strlen(argv[1]) != 32)
	{
		fprintf(stderr, "usage: gcm_seal KEY(32 bytes) NONCE AAD < plaintext\n");
		return 2;
	}
	inlen = fread(in, 1, sizeof(in), stdin);
	ctx = EVP_CIPHER_CTX_new();
	if (EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, (int) strlen(argv[2]), NULL) != 1 ||
		EVP_EncryptInit_ex(ctx, NULL, NULL, (unsigned char *) argv[1],
						   (unsigned char *) argv[2]) != 1 ||
		(strlen(argv[3]) > 0 &&
		 EVP_EncryptUpdate(ctx, NULL, &len, (unsigned char *) argv[3],
						   (int) strlen(argv[3])) != 1) ||
		EVP_EncryptUpdate(ctx, out, &len, in, (int) inlen) != 1 ||
		EVP_EncryptFinal_ex(ctx, out + len, &fin) != 1 ||
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, out + len + fin) != 1)
	{
		fprintf(stderr, "gcm_seal: encryption failed\n");
		return 1;
	}
	EVP_EncodeBlock(b64, out, len + fin + 16);
	printf("%s\n", b64);
	EVP_CIPHER_CTX_free(ctx);
	return 0;
}
